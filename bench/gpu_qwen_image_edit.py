"""One 1024x1024 Qwen-Image-Edit edit at 20 steps, through the real server, on random weights.

Measures what serving the flagship model costs on one GPU without downloading it: every
component has the real architecture and size (configs written out below from the published
``Qwen/Qwen-Image-Edit`` checkpoint: a 60-layer 20B MMDiT, the Qwen2.5-VL-7B text encoder,
the Qwen-Image VAE), with random bfloat16 weights created directly on the GPU (no CPU copy,
no fp32 detour). The tokenizer is the byte-level one of the tiny models (its special tokens
are wired into the text encoder's config), so nothing is read from the hub. The pipeline is
served in-process (``tests.servers.ThreadedServer``: ``create_app`` + uvicorn on 127.0.0.1)
through ``runners_for_pipeline``,
and the edit is one multipart POST, as a client sends it. Random weights make grey images:
the numbers are about time and memory, not quality.

    python bench/gpu_qwen_image_edit.py            # GPU, real sizes (about 58 GB of weights)
    python bench/gpu_qwen_image_edit.py --tiny     # CPU, tiny configs: checks the script in seconds

The report (markdown) is printed and written to ``$OUT`` (default ``bench/results``). It
needs what the server needs plus httpx, which the GPU machine's image has.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]  # run as a script, with or without the package installed

from tests.servers import ThreadedServer

from bench.gpu_levers import lever_table, measure_levers
from bench.random_weights import created_on
from diffuser_api.api.app import create_app
from diffuser_api.config import Settings
from diffuser_api.config.models_file import engine_limits
from diffuser_api.domain import ImageJob, Task
from diffuser_api.models import qwen_image_edit
from diffuser_api.models.checkpoint import probe_pipeline
from diffuser_api.models.in_memory import in_memory_spec, registry_of_one
from diffuser_api.models.loading import runners_for_pipeline
from diffuser_api.models.qwen_processor import Qwen2VLImageOnlyProcessor
from diffuser_api.models.registry import LoadedRunners
from diffuser_api.models.tiny import qwen_image as tiny
from diffuser_api.models.tiny.tokenizers import (
    QWEN_ENDOFTEXT_TOKEN_ID,
    QWEN_IM_END_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_TOKEN_ID,
    QWEN_VISION_START_TOKEN_ID,
    build_qwen2_tokenizer,
)

MODEL_ID = "qwen-image-edit-random"
# The byte-level tokenizer's special ids, in place of the real vocabulary's 151643...
TOKEN_IDS = dict(
    bos_token_id=QWEN_ENDOFTEXT_TOKEN_ID, eos_token_id=QWEN_IM_END_TOKEN_ID, image_token_id=QWEN_IMAGE_TOKEN_ID,
    video_token_id=QWEN_VIDEO_TOKEN_ID, vision_start_token_id=QWEN_VISION_START_TOKEN_ID,
    vision_end_token_id=QWEN_VISION_END_TOKEN_ID,
)
# Qwen/Qwen-Image-Edit transformer/config.json
TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
# Qwen/Qwen-Image-Edit vae/config.json (the Wan 2.1 VAE's latent statistics)
VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
)
# Qwen/Qwen-Image-Edit text_encoder/config.json (Qwen2.5-VL-7B-Instruct)
TEXT_ENCODER = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0,
        hidden_act="silu", rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]},
        bos_token_id=TOKEN_IDS["bos_token_id"], eos_token_id=TOKEN_IDS["eos_token_id"],
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        in_chans=3, hidden_act="silu",
    ),
    vocab_size=152064, hidden_size=3584, **TOKEN_IDS,
)
# Qwen/Qwen-Image-Edit scheduler/scheduler_config.json
SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
    time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
# Qwen/Qwen-Image-Edit processor/preprocessor_config.json
VISION_PIXELS = dict(min_pixels=3136, max_pixels=12845056)


def build_pipeline(tiny_sizes: bool, device: str, dtype: torch.dtype) -> QwenImageEditPipeline:
    transformer_config = tiny.TRANSFORMER_CONFIG if tiny_sizes else TRANSFORMER
    vae_config = tiny.VAE_CONFIG if tiny_sizes else VAE
    text_config = tiny.TEXT_ENCODER_CONFIG if tiny_sizes else TEXT_ENCODER
    pixels = dict(min_pixels=56 * 56, max_pixels=56 * 56) if tiny_sizes else VISION_PIXELS
    tokenizer = build_qwen2_tokenizer()
    torch.manual_seed(0)
    with created_on(device, dtype):
        transformer = QwenImageTransformer2DModel(**transformer_config).eval()
        vae = AutoencoderKLQwenImage(**vae_config).eval()
        text_encoder = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**text_config), dtype=dtype)
    return QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**({} if tiny_sizes else SCHEDULER)),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        processor=Qwen2VLImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels), tokenizer=tokenizer),
        transformer=transformer,
    )


def edit_over_http(base_url: str, size: int, steps: int) -> tuple[float, Image.Image]:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buffer, format="PNG")
    fields = {"prompt": "turn the sky into a sunset", "size": f"{size}x{size}", "num_inference_steps": str(steps),
              "seed": "0", "response_format": "b64_json"}
    started = time.perf_counter()
    response = httpx.post(f"{base_url}/v1/images/edits", data=fields,
                          files={"image": ("image.png", buffer.getvalue(), "image/png")}, timeout=600)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    return elapsed, image


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU in float32 (a quick check)")
    parser.add_argument("--size", type=int, help="output side (default 1024, tiny 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--levers-size", type=int,
                        help="side of the levers table's calls (default 512, tiny 64): 1024 would pass 4 minutes")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = args.size or (64 if args.tiny else 1024)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --tiny to check the script on CPU")

    started = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype)
    build_s = time.perf_counter() - started
    weights = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
               for name in ("transformer", "text_encoder", "vae")}
    weights_memory = torch.cuda.memory_allocated() if device == "cuda" else None

    settings = Settings(model_id=MODEL_ID, device=[device], warmup=False, request_timeout_s=600,
                        storage_dir=Path(tempfile.mkdtemp(prefix="bench-images-")), log_level="warning")
    family = qwen_image_edit.FAMILY
    spec = in_memory_spec(MODEL_ID, device, engine_limits(settings))
    registry = registry_of_one(spec, lambda: LoadedRunners(
        probe_pipeline(pipe, family, spec, settings).capabilities, runners_for_pipeline(pipe, family, [device]),
        type(pipe).__name__,
    ))
    with ThreadedServer(create_app(settings, registry)) as server:
        server.wait_ready(timeout_s=120)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        request_s, image = edit_over_http(server.base_url, size, args.steps)
    assert image.size == (size, size), f"asked for {size}x{size}, got {image.size}"
    family_caps = probe_pipeline(pipe, family, spec, settings).capabilities

    def edit_job(side: int) -> ImageJob:
        source = Image.effect_noise((side, side), 64).convert("RGB")
        return ImageJob(task=Task.EDIT, prompt="turn the sky into a sunset", width=side, height=side,
                        steps=args.steps, seeds=(0,), true_cfg_scale=family_caps.default_true_cfg_scale,
                        negative_prompt=family_caps.default_negative_prompt, images=(source,))

    runner = runners_for_pipeline(pipe, family, [device])[0]
    direct_started = time.perf_counter()
    runner.run([edit_job(size)], lambda step, total, previews: None)
    if device == "cuda":
        torch.cuda.synchronize()
    direct_s = time.perf_counter() - direct_started
    levers_size = args.levers_size or (64 if args.tiny else 512)
    levers = measure_levers(pipe, family, device, edit_job(levers_size), progress=print)

    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    peak = gib(torch.cuda.max_memory_allocated()) if device == "cuda" else "n/a (CPU)"
    report = "\n".join([
        f"# Qwen-Image-Edit, {'tiny configs' if args.tiny else 'real architecture'}, random weights",
        "",
        f"- card: {card}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}",
        (f"- parameters: transformer {weights['transformer'] / 1e9:.2f} B, text encoder "
         f"{weights['text_encoder'] / 1e9:.2f} B, VAE {weights['vae'] / 1e6:.0f} M"),
        f"- building the random pipeline on the device: {build_s:.1f} s"
        + (f", {gib(weights_memory)} allocated" if weights_memory is not None else ""),
        (f"- one edit through HTTP, {size}x{size}, {args.steps} steps, true CFG {family.default_true_cfg_scale:g} "
         f"(the family default: two transformer passes a step): **{request_s:.1f} s** wall"),
        f"- peak GPU memory during the request (torch.cuda.max_memory_allocated): **{peak}**",
        f"- returned image: {image.size[0]}x{image.size[1]}",
        f"- the same edit called directly afterwards (the runner, no HTTP): {direct_s:.1f} s; served / direct "
        f"**{request_s / direct_s:.2f}** (an upper bound: the served edit was the first call, with its set-up)",
        "",
        *lever_table(levers, f"Levers, {levers_size}x{levers_size}, {args.steps} steps, true CFG (bfloat16 first; "
                             "fp8 last, in place)"),
        "",
    ])
    print(report)
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_qwen_image_edit_tiny.md" if args.tiny else "gpu_qwen_image_edit.md"
    (out / name).write_text(report)


if __name__ == "__main__":
    main()
