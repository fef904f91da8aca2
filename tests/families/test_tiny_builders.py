"""Every tiny random-weight model builds, loads with plain ``DiffusionPipeline.from_pretrained``,
generates at 64x64 in 2 steps, reacts to its inputs, is deterministic per seed, and converts
with ``from_pipe`` to the image-to-image / inpainting pipelines diffusers has for its family.

Each model is built once per session (``ensure_tiny_model``) and loaded once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    QwenImageEditInpaintPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.qwenimage import (
    pipeline_qwenimage_edit,
    pipeline_qwenimage_edit_inpaint,
    pipeline_qwenimage_edit_plus,
)
from PIL import Image

import diffuser_api.models.qwen_processor  # noqa: F401  (lets diffusers resolve the tiny Qwen processor)
from diffuser_api.models.tiny import BUILDERS, ensure_tiny_model

pytestmark = pytest.mark.slow

SIZE = 64
STEPS = 2
MIN_DIFF = 2  # out of 255


@dataclass(frozen=True)
class Spec:
    pipeline: type
    img2img: type | None  # what AutoPipelineForImage2Image.from_pipe gives; None: it raises
    inpaint: type | None  # the same for AutoPipelineForInpainting
    edit: bool = False  # takes an input image
    guidance: dict[str, Any] | None = None  # two settings of the guidance knob, as call kwargs
    call: dict[str, Any] = field(default_factory=dict)


# Kontext rescales its output to max_area (default 1 MPix) and its input to ~1 MPix.
KONTEXT = {"max_area": SIZE * SIZE, "_auto_resize": False}
CFG = {"guidance_scale": (1.0, 7.0)}
TRUE_CFG = {"true_cfg_scale": (1.0, 4.0), "negative_prompt": "blurry"}

SPECS = {
    "tiny-sd": Spec(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                    guidance=CFG),
    "tiny-sdxl": Spec(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                      guidance=CFG),
    "tiny-sd3": Spec(StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline,
                     guidance=CFG),
    "tiny-flux": Spec(FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, guidance=CFG),
    "tiny-flux-kontext": Spec(FluxKontextPipeline, FluxKontextPipeline, None, edit=True, guidance=CFG, call=KONTEXT),
    "tiny-qwen-image": Spec(QwenImagePipeline, QwenImageImg2ImgPipeline, QwenImageInpaintPipeline,
                            guidance=TRUE_CFG, call={"true_cfg_scale": 1.0}),
    "tiny-qwen-image-edit": Spec(QwenImageEditPipeline, QwenImageEditPipeline, QwenImageEditInpaintPipeline,
                                 edit=True, guidance=TRUE_CFG, call={"true_cfg_scale": 1.0}),
    "tiny-qwen-image-edit-plus": Spec(QwenImageEditPlusPipeline, QwenImageEditPlusPipeline, None,
                                      edit=True, guidance=TRUE_CFG, call={"true_cfg_scale": 1.0}),
}


def gradient() -> Image.Image:
    ramp = np.linspace(0, 255, SIZE, dtype=np.uint8)
    rgb = np.stack([np.tile(ramp, (SIZE, 1)), np.tile(ramp[:, None], (1, SIZE)), np.full((SIZE, SIZE), 128, np.uint8)])
    return Image.fromarray(rgb.transpose(1, 2, 0))


IMAGE = gradient()
OTHER_IMAGE = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
MASK = Image.fromarray(np.pad(np.full((SIZE // 2, SIZE // 2), 255, np.uint8), SIZE // 4))


@pytest.fixture(autouse=True)
def small_qwen_edit_inputs(monkeypatch):
    """Qwen edit pipelines resize inputs to ~1 MPix (1.5-2 s a call here); cap it at 64x64."""
    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus, pipeline_qwenimage_edit_inpaint):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, original=original: original(min(area, SIZE * SIZE), ratio))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


_pipes: dict[str, DiffusionPipeline] = {}


@pytest.fixture
def pipe(request, tiny_dir) -> DiffusionPipeline:
    model_id = request.param
    if model_id not in _pipes:
        folder = ensure_tiny_model(model_id, tiny_dir)
        _pipes[model_id] = DiffusionPipeline.from_pretrained(folder)
        _pipes[model_id].set_progress_bar_config(disable=True)
    return _pipes[model_id]


def generate(pipe: DiffusionPipeline, spec: Spec, prompt: str = "a red cat", seed: int = 0, **kwargs) -> np.ndarray:
    args = dict(prompt=prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                generator=torch.Generator("cpu").manual_seed(seed), **spec.call)
    if spec.edit:
        args["image"] = IMAGE
    args.update(kwargs)
    image = pipe(**args).images[0]
    assert image.size == (SIZE, SIZE)
    return np.asarray(image, dtype=np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_every_builder_is_covered():
    assert set(SPECS) == set(BUILDERS)


@pytest.mark.parametrize("pipe", list(SPECS), indirect=True)
def test_generates_and_reacts(pipe, request):
    spec = SPECS[request.node.callspec.params["pipe"]]
    assert type(pipe) is spec.pipeline

    first = generate(pipe, spec)
    assert max_diff(first, generate(pipe, spec)) == 0, "same seed, different pixels"
    assert max_diff(first, generate(pipe, spec, prompt="a blue dog on green grass")) > MIN_DIFF, "ignores the prompt"
    assert max_diff(first, generate(pipe, spec, seed=1)) > MIN_DIFF, "ignores the seed"
    if spec.guidance:
        (knob, (low, high)), *rest = spec.guidance.items()
        low_img = generate(pipe, spec, **{knob: low}, **dict(rest))
        high_img = generate(pipe, spec, **{knob: high}, **dict(rest))
        assert max_diff(low_img, high_img) > MIN_DIFF, f"ignores {knob}"
    if spec.edit:
        assert max_diff(first, generate(pipe, spec, image=OTHER_IMAGE)) > MIN_DIFF, "ignores the input image"


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
@pytest.mark.parametrize("pipe", list(SPECS), indirect=True)
def test_from_pipe(pipe, task, request):
    spec = SPECS[request.node.callspec.params["pipe"]]
    auto = AutoPipelineForImage2Image if task == "img2img" else AutoPipelineForInpainting
    expected = getattr(spec, task)
    if expected is None:
        with pytest.raises(ValueError):
            auto.from_pipe(pipe, dtype=pipe.dtype)
        return

    for converted in (auto.from_pipe(pipe, dtype=pipe.dtype), expected.from_pipe(pipe, dtype=pipe.dtype)):
        assert type(converted) is expected
        assert converted.dtype == pipe.dtype
        for name, module in pipe.components.items():
            if name in converted.components and isinstance(module, torch.nn.Module):
                assert converted.components[name] is module, f"{name} not shared"

    converted.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {"image": IMAGE}
    if task == "inpaint":
        kwargs["mask_image"] = MASK
    elif not spec.edit:
        kwargs["strength"] = 0.75  # with 2 steps, 1 denoising step (SDXL's default 0.3 gives none)
    generate(converted, spec, **kwargs)
