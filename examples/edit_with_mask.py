"""Repaint part of an image: generate a picture, paint a mask whose transparent area is the
part to change, and send both to the edits endpoint.

    make serve                                   # in another terminal
    python examples/edit_with_mask.py [OUTPUT_DIR]

OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
pick the server; images go to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
Needs Pillow (pip install pillow) to draw the mask.
"""

import base64
import os
import sys
from pathlib import Path

import openai
from PIL import Image, ImageDraw

client = openai.OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "unused"),
)
output_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUTPUT_DIR", "."))
output_dir.mkdir(parents=True, exist_ok=True)

# Any PNG of your own works here; this one is generated so the example needs no input file.
room = output_dir / "room.png"
room.write_bytes(base64.b64decode(client.images.generate(prompt="an empty living room").data[0].b64_json))
print(f"wrote {room}")

# OpenAI's mask convention: the same size as the image, transparent (alpha 0) where the model
# may paint, opaque where the image must stay as it is.
width, height = Image.open(room).size
mask_image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
ImageDraw.Draw(mask_image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(0, 0, 0, 0))
mask = output_dir / "room-mask.png"
mask_image.save(mask)
print(f"wrote {mask}")

result = client.images.edit(
    image=room,
    mask=mask,
    prompt="a green velvet armchair in the middle of the room",
)
edited = output_dir / "room-edited.png"
edited.write_bytes(base64.b64decode(result.data[0].b64_json))
print(f"wrote {edited}")
