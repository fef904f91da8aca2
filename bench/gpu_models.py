"""GPU check: the warm tier. A model evicted to host RAM comes back in a fraction of a cold load.

    python bench/gpu_models.py           # CUDA: two SDXL-size random-weight models, bfloat16
    python bench/gpu_models.py --tiny    # CPU, tiny SDXL: checks the script in a minute

An SDXL-architecture pipeline with random weights (``gpu_sdxl.build_pipeline``: no download) is
saved to a scratch folder once, and served as two models, ``sdxl-a`` and ``sdxl-b``, by the
real server (``main.build_app`` from a models file, under uvicorn on 127.0.0.1) with room for
one model on the GPU (``max_loaded_models: 1``) and a host budget that holds one. Requests
A, B, A, B: the server loads A at start (cold, from disk), B evicts A to host RAM and loads
from disk (cold), then each comes back from host RAM (warm). The load seconds are the
server's own (``GET /v1/models/{id}``: a cold load includes the warm-up call; a warm reload
is the move back). Target: a warm reload takes at most a fifth of a cold load.

"From disk" is from the page cache at best (the files were just written), so cold loads here
are the fastest they can be and the ratio errs against the warm tier. On a CPU there is no
warm tier (host RAM is the device's memory): ``--tiny`` reloads from disk and says so.
Prints a markdown report and writes it to ``$OUT/gpu_models.md`` (or bench/results/).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script, with or without the package installed

import httpx
import torch
from tests.servers import ThreadedServer

from bench.gpu_sdxl import FULL, TINY, Scenario, build_pipeline, device_name
from bench.measure import Target
from diffuser_api.config import Settings
from diffuser_api.main import build_app

MODELS = ("sdxl-a", "sdxl-b")
HOST_BUDGET = {"cuda": "40GiB", "cpu": "4GiB"}  # room for one model's weights (bf16 SDXL: about 7 GB)


def save_checkpoint(scenario: Scenario, folder: Path) -> int:
    """The random-weight pipeline as a diffusers folder; returns its bytes of weights."""
    pipe = build_pipeline(scenario)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return sum(path.stat().st_size for path in folder.rglob("*.safetensors"))


def models_file(scenario: Scenario, checkpoint: Path, folder: Path) -> Path:
    dtype = str(scenario.dtype).split(".")[-1]
    size = f"{scenario.side}x{scenario.side}"
    entries = "".join(
        f"  - id: {model}\n    source: {checkpoint}\n    device: [{scenario.device}]\n    dtype: {dtype}\n"
        f"    defaults: {{steps: {scenario.steps}, size: {size}}}\n"
        for model in MODELS
    )
    path = folder / "models.yaml"
    path.write_text(f"default: {MODELS[0]}\nmax_loaded_models: 1\n"
                    f"host_memory_budget: {HOST_BUDGET[scenario.device]}\nmodels:\n{entries}")
    return path


def details(base_url: str, model: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/v1/models/{model}", timeout=30).json()


def request(base_url: str, model: str) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{base_url}/v1/images/generations", json={"model": model, "prompt": "a fox", "seed": 1},
                          timeout=900)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL on the CPU: a quick check of this script")
    args = parser.parse_args()
    scenario = TINY if args.tiny else FULL
    if scenario.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; run with --tiny on a CPU")
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="diffuser-gpu-models-"))
    progress(f"building and saving the pipeline ({device_name(scenario.device)})")
    weight_bytes = save_checkpoint(scenario, scratch / "sdxl-random")
    settings = Settings(_env_file=None, models_file=models_file(scenario, scratch / "sdxl-random", scratch),
                        storage_dir=scratch / "images", request_timeout_s=900)
    # (model, where it came from, load seconds, first request seconds)
    rows: list[tuple[str, str, float, float | None]] = []
    with ThreadedServer(build_app(settings)) as server:
        progress(f"loading {MODELS[0]} at start (cold)")
        server.wait_ready(timeout_s=900)
        first = details(server.base_url, MODELS[0])
        rows.append((MODELS[0], "disk (at start)", first["load_seconds"], None))
        hot_s = request(server.base_url, MODELS[0])
        for model in (MODELS[1], MODELS[0], MODELS[1]):
            # Where the weights come from, as the server tells it: offloaded (host RAM) or unloaded (disk).
            where = {"offloaded": "host RAM", "unloaded": "disk"}[details(server.base_url, model)["status"]]
            progress(f"{model} from {where}")
            latency = request(server.base_url, model)
            rows.append((model, where, details(server.base_url, model)["load_seconds"], latency))
        evicted = {model: details(server.base_url, model)["evictions"] for model in MODELS}
        resident = details(server.base_url, MODELS[1])["resident_bytes"]
    cold = [seconds for _, where, seconds, _ in rows if where.startswith("disk")]
    warm = [seconds for _, where, seconds, _ in rows if where == "host RAM"]
    target = None
    if warm:
        ratio = max(warm) / min(cold)
        target = Target("warm reload (host RAM -> device) / cold load (disk), worst of each", ratio, "≤ 0.20",
                        ratio <= 0.20)
    text = report(scenario, rows, hot_s, evicted, resident, weight_bytes, target, time.monotonic() - started)
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_models.md").write_text(text)
    progress(f"wrote {folder / 'gpu_models.md'}")
    print(text)


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def report(scenario: Scenario, rows: list[tuple[str, str, float, float | None]], hot_s: float,
           evicted: dict[str, dict[str, int]], resident: dict[str, int], weight_bytes: int, target: Target | None,
           elapsed_s: float) -> str:
    lines = [
        (f"# The warm tier: SDXL architecture, random weights ({'tiny, ' if scenario is TINY else ''}"
         f"{str(scenario.dtype).split('.')[-1]}), two models with room for one"),
        "",
        (f"Device: {device_name(scenario.device)}. Checkpoint: {gib(weight_bytes)} of safetensors; "
         f"resident on the device: {', '.join(f'{d} {gib(b)}' for d, b in resident.items()) or '–'}."),
        (f"Server: main.build_app + uvicorn, max_loaded_models 1, host_memory_budget "
         f"{HOST_BUDGET[scenario.device]}; requests {scenario.side}², {scenario.steps} steps. "
         f"Whole run: {elapsed_s:.0f} s."),
        "",
        "| model | came from | server's load seconds | first request s |",
        "|---|---|---|---|",
        *[f"| {model} | {where} | {seconds:.2f} | {'–' if latency is None else f'{latency:.2f}'} |"
          for model, where, seconds, latency in rows],
        f"| {MODELS[0]} | already loaded (hot) | – | {hot_s:.2f} |",
        "",
        "Evictions: " + "; ".join(f"{model}: {counts['host']} to host RAM, {counts['released']} released"
                                  for model, counts in evicted.items()),
        "",
    ]
    if target is None:
        lines.append("No warm tier on this device (CPU: host RAM is the device's memory): every reload was from disk.")
    else:
        lines += ["| ratio | measured | target | met |", "|---|---|---|---|",
                  f"| {target.name} | {target.value:.2f} | {target.goal} | {'yes' if target.met else 'no'} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
