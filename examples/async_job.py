"""Submit an async job with the official OpenAI Python SDK, poll it, and save its images.

    make serve                                   # in another terminal
    python examples/async_job.py [OUTPUT_DIR]

Long work need not hold a connection: the header ``Prefer: respond-async`` makes the server
answer 202 with a job at once; the job runs whether or not anyone waits, and
``GET /v1/images/jobs/{id}`` tells its status and, once completed, the usual images response.
OPENAI_BASE_URL (default http://127.0.0.1:8000/v1) and OPENAI_API_KEY (default "unused")
pick the server; images go to OUTPUT_DIR (the argument, else $OUTPUT_DIR, else ".").
"""

import base64
import os
import sys
import time
import uuid
from pathlib import Path

import openai

client = openai.OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "unused"),
)
output_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUTPUT_DIR", "."))
output_dir.mkdir(parents=True, exist_ok=True)

# with_raw_response: the answer is a job (202), not the images response the SDK would parse.
# An Idempotency-Key makes the SDK's own retries of this POST return the same job, not a second one.
raw = client.images.with_raw_response.generate(
    prompt="a lighthouse at dusk, oil painting",
    n=2,
    extra_body={"seed": 7},
    extra_headers={"Prefer": "respond-async", "Idempotency-Key": str(uuid.uuid4())},
)
job = raw.http_response.json()
print(f"submitted {job['id']} (HTTP {raw.http_response.status_code}, {job['status']})")

# The SDK's generic get() polls the job route (relative to base_url). A client that wants every
# step instead follows GET /v1/images/jobs/{id}/events (server-sent events).
while job["status"] in ("queued", "in_progress"):
    time.sleep(0.5)
    job = client.get(f"/images/jobs/{job['id']}", cast_to=object)
    print(f"{job['status']}: {job['progress']}%")

if job["status"] != "completed":
    sys.exit(f"job {job['id']} {job['status']}: {job['error']['message'] if job['error'] else ''}")
for item in job["result"]["data"]:
    path = output_dir / f"lighthouse-{item['seed']}.png"
    path.write_bytes(base64.b64decode(item["b64_json"]))
    print(f"wrote {path} (seed {item['seed']})")
