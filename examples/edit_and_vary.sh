#!/usr/bin/env bash
# Send an image file with curl as multipart form data (-F image=@FILE): two variations, then
# an edit of the same file. Without an IMAGE argument, a picture is generated first.
#
#   make serve                                   # in another terminal
#   bash examples/edit_and_vary.sh [OUTPUT_DIR] [IMAGE.png]
#
# OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
# pick the server; images go to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
# Needs curl and python3 (its standard library reads the JSON; no jq needed).
set -euo pipefail

base_url="${OPENAI_BASE_URL:-http://127.0.0.1:8000/v1}"
output_dir="${1:-${OUTPUT_DIR:-.}}"
mkdir -p "$output_dir"

# POSTs to an endpoint and saves the images of its answer as OUTPUT_DIR/PREFIX-N.png.
# --fail-with-body makes a 4xx/5xx fail the script; its body, the error envelope, says why.
post_and_save() {
  local endpoint="$1" prefix="$2" answer
  shift 2
  if ! answer=$(curl --silent --show-error --fail-with-body "$base_url/images/$endpoint" \
    -H "Authorization: Bearer ${OPENAI_API_KEY:-unused}" "$@"); then
    echo "$answer" >&2
    return 1
  fi
  python3 -c '
import base64, json, pathlib, sys
for index, item in enumerate(json.load(sys.stdin)["data"]):
    path = pathlib.Path(sys.argv[1]) / f"{sys.argv[2]}-{index}.png"
    path.write_bytes(base64.b64decode(item["b64_json"]))
    print(f"wrote {path}")
' "$output_dir" "$prefix" <<< "$answer"
}

image="${2:-}"
if [ -z "$image" ]; then
  post_and_save generations teapot -H "Content-Type: application/json" \
    -d '{"prompt": "a blue teapot", "response_format": "b64_json"}'
  image="$output_dir/teapot-0.png"
fi

# Multipart: a file part with @PATH, every other field as a plain value (numbers too).
post_and_save variations variation -F "image=@$image" -F n=2 -F response_format=b64_json
post_and_save edits edited -F "image=@$image" -F "prompt=the same teapot, painted gold" \
  -F strength=0.6 -F response_format=b64_json
