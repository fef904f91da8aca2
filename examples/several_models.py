"""Pick models by what they can do: list the served models, read each one's capabilities,
generate two pictures with one model, then combine them with a model that edits several
images at once (`model=` picks the model of each request).

    DIFFUSER_MODELS_FILE=models.example.yaml make serve      # in another terminal
    python examples/several_models.py [OUTPUT_DIR]

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

# GET /v1/models lists ids and status; GET /v1/models/{id} adds what each endpoint supports.
endpoints = {}
for model in client.models.list():
    endpoints[model.id] = client.models.retrieve(model.id).model_extra["endpoints"]
    supported = [name for name, supports in endpoints[model.id].items() if supports["supported"]]
    print(f"{model.id} ({model.model_extra['status']}): {', '.join(supported)}")

generator = next((id for id, supports in endpoints.items() if supports["generations"]["supported"]), None)
combiner = next((id for id, supports in endpoints.items() if supports["edits"]["multiple_images"]), None)
if generator is None or combiner is None:
    sys.exit("this server has no model that generates or none that edits several images at once; "
             "serve models.example.yaml (see the top of this file)")

inputs = []
for subject in ("a red apple", "a wicker basket"):
    result = client.images.generate(model=generator, prompt=subject)
    path = output_dir / f"{subject.replace(' ', '-')}.png"
    path.write_bytes(base64.b64decode(result.data[0].b64_json))
    inputs.append(path)
    print(f"wrote {path} ({generator})")

# Several images go as a list: the SDK sends them as image[] parts.
result = client.images.edit(model=combiner, image=inputs, prompt="the apple from image 1 in the basket from image 2")
combined = output_dir / "apple-in-basket.png"
combined.write_bytes(base64.b64decode(result.data[0].b64_json))
print(f"wrote {combined} ({combiner})")
