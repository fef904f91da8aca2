"""GPU check: SDXL-architecture random weights, direct pipeline call vs. the server.

    python bench/gpu_sdxl.py           # CUDA, bfloat16, 1024x1024, 20 steps; < 4 min on an H100
    python bench/gpu_sdxl.py --tiny    # CPU, tiny SDXL, 64x64: checks the script in seconds

The pipeline is built in memory (real SDXL base shapes, random weights created on the GPU in
bfloat16, offline character tokenizers), so no download is needed. The server is the real
``create_app`` under uvicorn on 127.0.0.1, with a registry whose loader hands it the same
in-memory pipeline; clients are bench/load.py's asyncio HTTP/1.1 driver. Prints a markdown
report and writes it to ``$OUT/gpu_sdxl.md`` (or ``bench/results/gpu_sdxl.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script, with or without the package installed

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tests.servers import ThreadedServer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench import load, tables
from bench.direct import PROMPT, DirectPipeline
from bench.gpu_levers import LeverRow, lever_table, measure_levers
from bench.measure import Measurement, Target
from bench.random_weights import created_on
from diffuser_api.api.app import create_app
from diffuser_api.config import Settings
from diffuser_api.config.models_file import engine_limits
from diffuser_api.domain import ImageJob, Task
from diffuser_api.errors import NotSupported
from diffuser_api.models import stable_diffusion
from diffuser_api.models.checkpoint import probe_pipeline
from diffuser_api.models.families import family_for
from diffuser_api.models.family import Family
from diffuser_api.models.in_memory import in_memory_spec, registry_of_one
from diffuser_api.models.loading import runners_for_pipeline
from diffuser_api.models.registry import LoadedRunners, ModelRegistry
from diffuser_api.models.tiny import sdxl as tiny_sdxl
from diffuser_api.models.tiny import stable_diffusion as tiny_sd
from diffuser_api.models.tiny.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer

T = TypeVar("T")
PIPELINE_CLASS = "StableDiffusionXLPipeline"
MODEL_ID = "sdxl-random"

# stabilityai/stable-diffusion-xl-base-1.0, written out so nothing is downloaded.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# The real encoders' shapes (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) with the offline
# tokenizer's special ids; its 514 ids fit in the real 49408-entry embedding.
TOKEN_IDS = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513, max_position_embeddings=77)
CLIP_L = dict(TOKEN_IDS, vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(TOKEN_IDS, vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
assert CLIP_VOCAB_SIZE <= CLIP_L["vocab_size"]


@dataclass(frozen=True)
class Scenario:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_1: dict[str, Any]
    text_2: dict[str, Any]
    device: str
    dtype: torch.dtype
    side: int
    steps: int
    batch: int
    clients: int
    single_calls: int
    batched_calls: int


FULL = Scenario(SDXL_UNET, SDXL_VAE, CLIP_L, CLIP_BIGG, "cuda", torch.bfloat16, side=1024, steps=20, batch=8,
                clients=8, single_calls=3, batched_calls=2)
TINY = Scenario(tiny_sdxl.UNET_XL_CONFIG, tiny_sd.VAE_CONFIG, tiny_sd.CLIP_CONFIG, tiny_sd.CLIP_CONFIG, "cpu",
                torch.float32, side=64, steps=4, batch=8, clients=8, single_calls=5, batched_calls=5)


def build_pipeline(scenario: Scenario) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    with created_on(scenario.device, scenario.dtype):
        models = {
            "vae": AutoencoderKL(**scenario.vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**scenario.text_1)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**scenario.text_2)),
            "unet": UNet2DConditionModel(**scenario.unet),
        }
    # The scheduler keeps its tables in float32 on the host, as from_pretrained leaves them.
    return StableDiffusionXLPipeline(
        **models, tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(**tiny_sd.SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def on_passing_thread(function: Callable[[], T]) -> T:
    """Run direct calls on a thread that ends afterwards: a live thread that ran torch keeps an
    OpenMP team, which slows the server worker's CPU ops (see ``models/registry.py``)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function).result()


def sdxl_family() -> Family:
    """The server's SDXL family where this checkout has one; otherwise SD's, whose per-image
    prompt and generator arguments SDXL's pipeline takes as they are."""
    try:
        return family_for(PIPELINE_CLASS)
    except NotSupported:
        return dataclasses.replace(stable_diffusion.FAMILY, name="stable-diffusion-xl",
                                   pipeline_classes=frozenset({PIPELINE_CLASS}), default_guidance_scale=5.0)


def in_memory_registry(pipe: Any, family: Family, settings: Settings, device: str) -> ModelRegistry:
    """A registry whose loader hands over the pipeline already built, as load_model would."""
    spec = in_memory_spec(MODEL_ID, device, engine_limits(settings))

    def load() -> LoadedRunners:
        capabilities = probe_pipeline(pipe, family, spec, settings).capabilities
        return LoadedRunners(capabilities, runners_for_pipeline(pipe, family, [device]), PIPELINE_CLASS)

    return registry_of_one(spec, load)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU, {os.cpu_count()} cores (torch {torch.__version__}, {torch.get_num_threads()} threads)"


def report(
    scenario: Scenario, phases: list[Measurement], targets: list[Target], elapsed_s: float,
    levers: list[LeverRow] | None = None,
) -> str:
    lines = [
        (f"# SDXL architecture, random weights: direct call vs. served ({'tiny, ' if scenario is TINY else ''}"
         f"{scenario.side}×{scenario.side}, {scenario.steps} steps, {str(scenario.dtype).split('.')[-1]})"),
        "",
        f"Device: {device_name(scenario.device)}. Server: create_app + uvicorn on 127.0.0.1 in the same process,",
        (f"max batch {scenario.batch}; latency per HTTP request includes PNG encoding and base64. "
         f"Whole run: {elapsed_s:.0f} s."),
        "",
        *tables.measurements(phases, cpu=False),
        "",
        *tables.targets(targets),
    ]
    if levers:
        lines += ["", *lever_table(levers, f"Levers, {scenario.side}×{scenario.side}, {scenario.steps} steps "
                                           "(a UNet family: no step cache)")]
    return "\n".join(lines) + "\n"


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

    progress(f"building the pipeline on {device_name(scenario.device)}")
    pipe = build_pipeline(scenario)
    family = sdxl_family()
    direct = DirectPipeline(pipe, family)
    side, steps, batch = scenario.side, scenario.steps, scenario.batch
    progress("direct calls")
    direct_single = on_passing_thread(lambda: direct.measure(
        "direct, 1 image per call", batch=1, side=side, steps=steps, calls=scenario.single_calls))
    direct_batched = on_passing_thread(lambda: direct.measure(
        f"direct, batches of {batch}", batch=batch, side=side, steps=steps, calls=scenario.batched_calls))
    half = side // 2
    progress(f"direct calls at {half}x{half}: batching gain")
    half_single = on_passing_thread(lambda: direct.measure(
        "direct, 1 image per call", batch=1, side=half, steps=steps, calls=scenario.single_calls))
    half_batched = on_passing_thread(lambda: direct.measure(
        f"direct, batches of {batch}", batch=batch, side=half, steps=steps, calls=scenario.batched_calls))

    settings = Settings(_env_file=None, model_id=MODEL_ID, max_batch_size=batch,
                        max_batch_pixels=batch * side * side, storage_dir=Path(tempfile.mkdtemp()) / "images")
    app = create_app(settings, in_memory_registry(pipe, family, settings, scenario.device))
    with ThreadedServer(app) as server:
        server.wait_ready(timeout_s=120)
        progress("served, 1 client")
        served_single = load.run_clients(server.base_url, "served, 1 client", side=side, steps=steps, clients=1,
                                         requests=scenario.single_calls, batch=batch)
        progress(f"served, {scenario.clients} clients")
        # The direct batched calls already warmed this pipeline at this batch size.
        served_many = load.run_clients(
            server.base_url, f"served, {scenario.clients} concurrent clients", side=side, steps=steps,
            clients=scenario.clients, requests=scenario.clients * scenario.batched_calls, batch=batch,
            warmup_requests=0,
        )
    latency = served_single.p50_ms / direct_single.p50_ms
    throughput = served_many.images_per_s / direct_batched.images_per_s
    gain = served_many.images_per_s / served_single.images_per_s
    progress("levers")
    lever_job = ImageJob(task=Task.GENERATION, prompt=PROMPT, width=side, height=side, steps=steps, seeds=(0,),
                         guidance_scale=family.default_guidance_scale)
    levers = on_passing_thread(lambda: measure_levers(pipe, family, scenario.device, lever_job, progress=progress))
    targets = [
        Target("served / direct latency, 1 client (p50)", latency, "≤ 1.10", latency <= 1.10),
        Target(f"served {scenario.clients} clients / direct batches of {batch}, throughput", throughput, "≥ 0.6",
               throughput >= 0.6),
        Target(f"served {scenario.clients} clients / served 1 client, throughput", gain, "> 1 (batching pays)",
               gain > 1),
    ]
    for label, single, batched in ((f"{half}×{half}", half_single, half_batched),
                                   (f"{side}×{side}", direct_single, direct_batched)):
        ratio = batched.images_per_s / single.images_per_s
        targets.append(Target(f"batching gain at {label}: direct batches of {batch} / 1 image, throughput", ratio,
                              "reported", True))
    phases = [direct_single, direct_batched, half_single, half_batched, served_single, served_many]
    text = report(scenario, phases, targets, time.monotonic() - started, levers)
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_sdxl.md").write_text(text)
    progress(f"wrote {folder / 'gpu_sdxl.md'}")
    print(text)


if __name__ == "__main__":
    main()
