#!/usr/bin/env bash
# Generate an image with curl (JSON body) and decode its base64 into a PNG file.
#
#   make serve                                   # in another terminal
#   bash examples/generate.sh [OUTPUT_DIR]
#
# OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
# pick the server; the image goes to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
# Needs curl and python3 (its standard library reads the JSON; no jq needed).
set -euo pipefail

base_url="${OPENAI_BASE_URL:-http://127.0.0.1:8000/v1}"
output_dir="${1:-${OUTPUT_DIR:-.}}"
mkdir -p "$output_dir"

# --fail-with-body makes a 4xx/5xx fail the script; its body, the error envelope, says why.
if ! answer=$(curl --silent --show-error --fail-with-body "$base_url/images/generations" \
  -H "Authorization: Bearer ${OPENAI_API_KEY:-unused}" \
  -H "Content-Type: application/json" \
  -d '{"prompt": "a watercolor fox in a snowy forest", "seed": 42, "response_format": "b64_json"}'); then
  echo "$answer" >&2
  exit 1
fi

python3 -c '
import base64, json, pathlib, sys
for item in json.load(sys.stdin)["data"]:
    seed = item["seed"]
    path = pathlib.Path(sys.argv[1]) / f"fox-{seed}.png"
    path.write_bytes(base64.b64decode(item["b64_json"]))
    print(f"wrote {path}")
' "$output_dir" <<< "$answer"
