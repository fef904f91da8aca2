"""Ray Serve's cost and its replicas, on this machine: the 16-client workload (tiny-sd, 64², 4
steps) through ``diffuser-api serve`` and through ``diffuser-api serve --ray`` with one
replica (Ray's overhead as a ratio, target ≥ 0.9×) and with two replicas.

Ray runs here with a logical CPU count of 3 on the machine's cores: one replica is given 2
CPUs (so Ray lets torch use 2 threads, as the single process does), two replicas 1 each, and
the ingress a quarter. The single-process server and the Ray application serve at the same
time and their phases run in interleaved rounds, so a burst of other work lands on both sides
of a ratio. Writes bench/results/ray.md and bench/results/ray.png.

``--gpu`` is the script for a machine with one GPU (an H200): one model (``--model``) with
one replica on the whole GPU vs two replicas sharing it (``num_gpus: 0.5``), at ``--size`` and
``--steps``. ``--tiny`` runs that GPU script's code on the CPU with tiny-sd, to check it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, this folder comes first on sys.path, and this file would shadow Ray itself.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import ray
import yaml
from tests.conftest import TINY_CACHE, LiveServer

from bench import load, tables
from bench.measure import Measurement, Target, cpu_pressure

CLIENTS = 16
SIDE, STEPS = 64, 4
ROUNDS = 3
LOGICAL_CPUS = 3
RAY_START_TIMEOUT_S = 600.0


def models_file(path: Path, source: str, replicas: int, num_cpus: float, num_gpus: float) -> Path:
    entry = {"id": "bench", "source": source,
             "ray": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}}
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


@contextlib.contextmanager
def ray_cluster(scratch: Path, gpus: int) -> Iterator[str]:
    """A Ray instance of this process (no dashboard, a small object store); yields its address."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=LOGICAL_CPUS, num_gpus=gpus, include_dashboard=False, object_store_memory=200 * 1024**2,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"), logging_level="warning", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def served(scratch: Path, *, args: tuple[str, ...] = (), timeout_s: float = 300.0, **env: str) -> Iterator[LiveServer]:
    server = LiveServer(scratch, args=args, **env)
    try:
        server.wait_ready(timeout_s)
        yield server
    finally:
        server.stop()


def on_ray(scratch: Path, address: str, name: str, source: str, replicas: int, num_cpus: float,
           num_gpus: float, **env: str) -> contextlib.AbstractContextManager[LiveServer]:
    models = models_file(scratch / f"{name}.yaml", source, replicas, num_cpus, num_gpus)
    return _then_serve_shutdown(served(scratch, args=("--ray-address", address), timeout_s=RAY_START_TIMEOUT_S,
                                       DIFFUSER_MODELS_FILE=str(models), **env))


@contextlib.contextmanager
def _then_serve_shutdown(server: contextlib.AbstractContextManager[LiveServer]) -> Iterator[LiveServer]:
    """A joined cluster keeps Serve (and its HTTP port) after the app leaves; the next stage
    starts Serve on its own port."""
    from ray import serve

    try:
        with server as running:
            yield running
    finally:
        serve.shutdown()


def phase(
    server: LiveServer, label: str, requests: int, side: int, steps: int, batch: int
) -> Callable[[], Measurement]:
    return lambda: load.run_clients(server.base_url, label, side=side, steps=steps, clients=CLIENTS,
                                    requests=requests, batch=batch)


def interleaved(phases: dict[str, Callable[[], Measurement]], rounds: int) -> dict[str, Measurement]:
    parts: dict[str, list[Measurement]] = {name: [] for name in phases}
    for _ in range(rounds):
        for name, run in phases.items():
            parts[name].append(run())
    return {name: Measurement.pooled(measured) for name, measured in parts.items()}


def cpu_run(scratch: Path, requests: int, rounds: int) -> tuple[list[Measurement], list[Target]]:
    batch = 8
    with served(scratch) as single, ray_cluster(scratch, gpus=0) as address:
        with on_ray(scratch, address, "one", "tiny-sd", 1, 2.0, 0.0) as one:
            first = interleaved({"single": phase(single, "serve (one process)", requests, SIDE, STEPS, batch),
                                 "ray": phase(one, "serve --ray, 1 replica", requests, SIDE, STEPS, batch)}, rounds)
        with on_ray(scratch, address, "two", "tiny-sd", 2, 1.0, 0.0) as two:
            second = interleaved({"single": phase(single, "serve (one process)", requests, SIDE, STEPS, batch),
                                  "ray": phase(two, "serve --ray, 2 replicas", requests, SIDE, STEPS, batch)}, rounds)
    one_ratio = first["ray"].images_per_s / first["single"].images_per_s
    two_ratio = second["ray"].images_per_s / second["single"].images_per_s
    targets = [
        Target(f"serve --ray, 1 replica / serve, {CLIENTS} clients, {SIDE}², {STEPS} steps", one_ratio, "≥ 0.9",
               one_ratio >= 0.9, unit="×"),
        Target(f"serve --ray, 2 replicas / serve, {CLIENTS} clients (2 cores: nothing to double)", two_ratio,
               "reported", True, unit="×"),
    ]
    return [first["single"], first["ray"], second["single"], second["ray"]], targets


def gpu_run(scratch: Path, source: str, side: int, steps: int, requests: int, rounds: int,
            tiny: bool) -> tuple[list[Measurement], list[Target]]:
    """One replica on the whole GPU vs two sharing it; ``tiny``: the same code on the CPU."""
    gpus, whole, half = (0, 0.0, 0.0) if tiny else (1, 1.0, 0.5)
    env = {} if tiny else {"DIFFUSER_DEVICE": "cuda", "DIFFUSER_CACHE_DIR": os.environ.get("DIFFUSER_CACHE_DIR", "")}
    env = {key: value for key, value in env.items() if value}
    with ray_cluster(scratch, gpus=gpus) as address:
        with on_ray(scratch, address, "one", source, 1, 1.0, whole, **env) as one:
            single = interleaved({"one": phase(one, "1 replica, whole GPU", requests, side, steps, 8)}, rounds)["one"]
        with on_ray(scratch, address, "two", source, 2, 1.0, half, **env) as two:
            double = interleaved({"two": phase(two, "2 replicas, num_gpus 0.5", requests, side, steps, 8)},
                                 rounds)["two"]
    ratio = double.images_per_s / single.images_per_s
    return [single, double], [Target("2 replicas sharing the GPU / 1 replica", ratio, "reported", True, unit="×")]


def plot(phases: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5))
    labels = [f"{m.label}\n(round set {index // 2 + 1})" for index, m in enumerate(phases)]
    axes.barh(labels, [m.images_per_s for m in phases], color=["#888", "#3a7", "#888", "#37a"][: len(phases)])
    axes.set_xlabel("images/s")
    axes.set_title(f"{CLIENTS} clients, tiny-sd {SIDE}², {STEPS} steps")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--requests", type=int, default=96, help="requests per phase and round")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--gpu", action="store_true", help="one replica vs two sharing one GPU")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: check the script on the CPU with tiny-sd")
    parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="diffuser-bench-ray-"))
    pressure_before = cpu_pressure()
    os.environ.setdefault("DIFFUSER_CACHE_DIR", str(TINY_CACHE))
    if args.gpu:
        source, side, steps = ("tiny-sd", SIDE, STEPS) if args.tiny else (args.model, args.size, args.steps)
        phases, targets = gpu_run(scratch, source, side, steps, args.requests, args.rounds, args.tiny)
        name = "ray-gpu-tiny" if args.tiny else "ray-gpu"
    else:
        phases, targets = cpu_run(scratch, args.requests, args.rounds)
        name = "ray"
    notes = [
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPU cores shared with other work; "
        f"before: {pressure_before}; after: {cpu_pressure()}",
        f"ray {ray.__version__}; phases ran in {args.rounds} interleaved rounds; each row pools its rounds.",
        "Ray rows count everything between the client and the replica: Ray's proxy, the ingress replica, the "
        "handle call and the object store; the load generator runs on the same cores.",
    ]
    text = "\n".join([f"# Ray Serve benchmark ({name})", "", *tables.measurements(phases, cpu=False), "",
                      *tables.targets(targets), "", *(f"- {note}" for note in notes), ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    if not args.gpu:
        plot(phases, args.out / f"{name}.png")
    print(text)


if __name__ == "__main__":
    main()
