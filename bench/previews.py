"""Preview overhead: streamed requests with partial_images=3 against partial_images=0.

Both arms stream through the same live server (tiny-sd, 256x256, 20 steps), alternating
requests so machine noise hits both alike; the ratio of medians is the overhead.
Run: python bench/previews.py [--runs N] (writes bench/results/previews.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import LiveServer

RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = {"prompt": "a lighthouse at dusk", "size": "256x256", "num_inference_steps": 20, "stream": True, "seed": 1}


def streamed_seconds(base_url: str, partial_images: int) -> tuple[float, int]:
    started = time.perf_counter()
    partials = 0
    payload = PAYLOAD | {"partial_images": partial_images}
    with httpx.stream("POST", f"{base_url}/v1/images/generations", json=payload, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            partials += line.startswith("event: image_generation.partial_image")
    return time.perf_counter() - started, partials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--preview-scale", help="DIFFUSER_PREVIEW_SCALE for the server (default: its own)")
    args = parser.parse_args()
    env = {"DIFFUSER_PREVIEW_SCALE": args.preview_scale} if args.preview_scale else {}
    with tempfile.TemporaryDirectory() as scratch:
        server = LiveServer(Path(scratch), **env)
        try:
            server.wait_ready()
            streamed_seconds(server.base_url, 3)  # first-call costs out of the way
            plain, previewed = [], []
            for _ in range(args.runs):
                plain.append(streamed_seconds(server.base_url, 0)[0])
                seconds, partials = streamed_seconds(server.base_url, 3)
                assert partials == 3, f"expected 3 partial images, got {partials}"
                previewed.append(seconds)
        finally:
            server.stop()
    base, with_previews = statistics.median(plain), statistics.median(previewed)
    overhead = with_previews / base - 1
    report = (
        "# Preview overhead (tiny-sd, 256x256, 20 steps, streamed)\n\n"
        f"| arm | median request time | runs |\n|---|---|---|\n"
        f"| partial_images=0 | {base * 1000:.0f} ms | {args.runs} |\n"
        f"| partial_images=3 | {with_previews * 1000:.0f} ms | {args.runs} |\n\n"
        f"**Overhead of 3 VAE-decoded previews: {overhead:+.1%}** (target <= 10 %).\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "previews.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
