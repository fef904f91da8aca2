"""Generate two images with the official OpenAI Python SDK and save them as PNG files.

    make serve                                   # in another terminal
    python examples/generate.py [OUTPUT_DIR]

OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
pick the server; images go to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
"""

import base64
import os
import sys
from pathlib import Path

import openai

client = openai.OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "unused"),
)
output_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUTPUT_DIR", "."))
output_dir.mkdir(parents=True, exist_ok=True)

# The size, steps and guidance default to the model's own; seed, steps, guidance and
# negative_prompt are diffusers extras that the SDK sends through extra_body.
result = client.images.generate(
    prompt="a watercolor fox in a snowy forest",
    n=2,
    extra_body={"seed": 42, "negative_prompt": "blurry"},
)
for item in result.data:
    seed = item.model_extra["seed"]  # n images get seeds 42, 43: each one reproducible alone
    path = output_dir / f"fox-{seed}.png"
    path.write_bytes(base64.b64decode(item.b64_json))
    print(f"wrote {path} (seed {seed}, prompt {item.revised_prompt!r})")
