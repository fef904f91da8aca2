"""Make two variations of an image (here a generated one; any PNG of yours works too).

    make serve                                   # in another terminal
    python examples/variations.py [OUTPUT_DIR]

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

original = output_dir / "teapot.png"
original.write_bytes(base64.b64decode(client.images.generate(prompt="a blue teapot").data[0].b64_json))
print(f"wrote {original}")

# How a model makes variations (image-to-image with a prompt and strength, or an image
# encoder) is listed in GET /v1/models/{id} under endpoints.variations.method. The SDK warns
# that create_variation is deprecated (OpenAI's own models dropped it); this server keeps it.
result = client.images.create_variation(image=original, n=2)
for index, item in enumerate(result.data):
    path = output_dir / f"teapot-variation-{index}.png"
    path.write_bytes(base64.b64decode(item.b64_json))
    print(f"wrote {path} (seed {item.model_extra['seed']})")
