"""Generate several images at once with AsyncOpenAI: the server queues and batches them.

    make serve                                   # in another terminal
    python examples/generate_async.py [OUTPUT_DIR]

OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
pick the server; images go to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
"""

import asyncio
import base64
import os
import sys
from pathlib import Path

import openai

PROMPTS = ["a red lighthouse at dusk", "a paper boat on a pond", "a cat made of clouds"]


async def generate(client: openai.AsyncOpenAI, prompt: str, output_dir: Path) -> Path:
    result = await client.images.generate(prompt=prompt)
    path = output_dir / f"{prompt.replace(' ', '-')}.png"
    path.write_bytes(base64.b64decode(result.data[0].b64_json))
    return path


async def main() -> None:
    client = openai.AsyncOpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
    )
    output_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUTPUT_DIR", "."))
    output_dir.mkdir(parents=True, exist_ok=True)
    # Sent together, the requests wait in the server's queue and run in batches.
    for path in await asyncio.gather(*(generate(client, prompt, output_dir) for prompt in PROMPTS)):
        print(f"wrote {path}")


asyncio.run(main())
