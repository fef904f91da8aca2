"""GPU check: FLUX.1-dev architecture, random weights; served vs direct, batching, and the levers.

    python bench/gpu_flux.py           # CUDA, bfloat16, 1024x1024, 20 steps (about 33 GB of weights)
    python bench/gpu_flux.py --tiny    # CPU, tiny Flux, 64x64: checks the script in a minute

The pipeline is built in memory with FLUX.1-dev's published shapes (a 12B transformer of 19
double and 38 single blocks, T5-XXL, CLIP-L, the 16-channel VAE) and random bfloat16 weights
created on the GPU; the tokenizers are the tiny models' offline ones, so nothing is
downloaded. One run reports: served vs direct latency (``create_app`` + uvicorn on 127.0.0.1,
one client), the batching gain of direct calls at 512² and 1024², and the levers table
(``bench/gpu_levers.py``: each step cache with its PSNR against the uncached image, three
previews, regional compilation, fp8 weight-only quantization). Random weights make noise:
PSNR here says how far a cache moves the pixels, not whether the image still looks right.
Writes ``$OUT/gpu_flux.md`` (or ``bench/results/gpu_flux.md``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script, with or without the package installed

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tests.servers import ThreadedServer
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from bench import load, tables
from bench.direct import PROMPT, DirectPipeline
from bench.gpu_levers import lever_table, measure_levers
from bench.gpu_sdxl import CLIP_L, device_name, on_passing_thread
from bench.measure import Target
from bench.random_weights import created_on
from diffuser_api.api.app import create_app
from diffuser_api.config import Settings
from diffuser_api.config.models_file import engine_limits
from diffuser_api.domain import ImageJob, Task
from diffuser_api.models import flux
from diffuser_api.models.checkpoint import probe_pipeline
from diffuser_api.models.in_memory import in_memory_spec, registry_of_one
from diffuser_api.models.loading import runners_for_pipeline
from diffuser_api.models.registry import LoadedRunners, ModelRegistry
from diffuser_api.models.tiny import flux as tiny_flux
from diffuser_api.models.tiny import stable_diffusion as tiny_sd
from diffuser_api.models.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer

MODEL_ID = "flux-random"
# black-forest-labs/FLUX.1-dev, written out so nothing is downloaded.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=1024,
                use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)


@dataclass(frozen=True)
class Scenario:
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip: dict[str, Any]
    t5: dict[str, Any]
    device: str
    dtype: torch.dtype
    side: int
    steps: int
    batch: int
    calls: int


FULL = Scenario(FLUX_TRANSFORMER, FLUX_VAE, CLIP_L, T5_XXL, "cuda", torch.bfloat16, side=1024, steps=20, batch=4,
                calls=2)
TINY = Scenario(tiny_flux.TRANSFORMER_CONFIG, tiny_flux.VAE_FLUX_CONFIG, tiny_sd.CLIP_CONFIG, tiny_flux.T5_CONFIG,
                "cpu", torch.float32, side=64, steps=4, batch=4, calls=2)


def build_pipeline(scenario: Scenario) -> FluxPipeline:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    with created_on(scenario.device, scenario.dtype):
        models = {
            "vae": AutoencoderKL(**scenario.vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**scenario.clip)),
            "text_encoder_2": T5EncoderModel(T5Config(**scenario.t5)),
            "transformer": FluxTransformer2DModel(**scenario.transformer),
        }
    return FluxPipeline(**models, tokenizer=tokenizer, tokenizer_2=build_t5_tokenizer(),
                        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


def in_memory_registry(pipe: Any, settings: Settings, device: str) -> ModelRegistry:
    spec = in_memory_spec(MODEL_ID, device, engine_limits(settings))

    def load_runners() -> LoadedRunners:
        capabilities = probe_pipeline(pipe, flux.FAMILY, spec, settings).capabilities
        return LoadedRunners(capabilities, runners_for_pipeline(pipe, flux.FAMILY, [device]), "FluxPipeline")

    return registry_of_one(spec, load_runners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Flux on the CPU: a quick check of this script")
    args = parser.parse_args()
    scenario = TINY if args.tiny else FULL
    if scenario.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; run with --tiny on a CPU")
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    progress(f"building the pipeline on {device_name(scenario.device)}")
    pipe = build_pipeline(scenario)
    direct = DirectPipeline(pipe, flux.FAMILY)
    side, steps, batch, calls = scenario.side, scenario.steps, scenario.batch, scenario.calls
    phases, targets = [], []
    for size in (side // 2, side):
        progress(f"direct calls at {size}x{size}")
        single = on_passing_thread(lambda size=size: direct.measure(
            "direct, 1 image per call", batch=1, side=size, steps=steps, calls=calls))
        batched = on_passing_thread(lambda size=size: direct.measure(
            f"direct, batches of {batch}", batch=batch, side=size, steps=steps, calls=1))
        phases += [single, batched]
        gain = batched.images_per_s / single.images_per_s
        targets.append(Target(f"batching gain at {size}×{size}: batches of {batch} / 1 image, throughput", gain,
                              "reported", True))
    direct_single = phases[-2]
    settings = Settings(_env_file=None, model_id=MODEL_ID, max_batch_size=batch, max_batch_pixels=batch * side * side,
                        storage_dir=Path(tempfile.mkdtemp()) / "images")
    with ThreadedServer(create_app(settings, in_memory_registry(pipe, settings, scenario.device))) as server:
        server.wait_ready(timeout_s=120)
        progress("served, 1 client")
        served = load.run_clients(server.base_url, "served, 1 client", side=side, steps=steps, clients=1,
                                  requests=calls, batch=batch)
    phases.append(served)
    latency = served.p50_ms / direct_single.p50_ms
    targets.insert(0, Target("served / direct latency, 1 client (p50)", latency, "≤ 1.05", latency <= 1.05))
    lever_job = ImageJob(task=Task.GENERATION, prompt=PROMPT, width=side, height=side, steps=steps, seeds=(0,),
                         guidance_scale=flux.FAMILY.default_guidance_scale)
    levers = on_passing_thread(lambda: measure_levers(pipe, flux.FAMILY, scenario.device, lever_job,
                                                      progress=progress))
    lines = [
        f"# FLUX.1-dev architecture, random weights ({'tiny, ' if args.tiny else ''}{side}×{side}, {steps} steps, "
        f"{str(scenario.dtype).split('.')[-1]})",
        "",
        f"Device: {device_name(scenario.device)}. Whole run: {time.monotonic() - started:.0f} s.",
        "",
        *tables.measurements(phases, cpu=False),
        "",
        *tables.targets(targets),
        "",
        *lever_table(levers, f"Levers, {side}×{side}, {steps} steps"),
    ]
    text = "\n".join(lines) + "\n"
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_flux.md").write_text(text)
    progress(f"wrote {folder / 'gpu_flux.md'}")
    print(text)


if __name__ == "__main__":
    main()
