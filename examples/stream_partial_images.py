"""Stream a generation: two previews (partial images) while it denoises, then the final image.

    make serve                                   # in another terminal
    python examples/stream_partial_images.py [OUTPUT_DIR]

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

stream = client.images.generate(prompt="a hot air balloon over hills", stream=True, partial_images=2)
for event in stream:
    if event.type == "image_generation.partial_image":
        path = output_dir / f"balloon-partial-{event.partial_image_index}.png"
    else:  # image_generation.completed
        path = output_dir / "balloon.png"
    path.write_bytes(base64.b64decode(event.b64_json))
    print(f"{event.type}: wrote {path}")
