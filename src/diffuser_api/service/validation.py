"""Checks a request against the model's capabilities and fills in what it left out.

Every refusal names its parameter (a 400); nothing a request asks for is silently dropped.
"""

from __future__ import annotations

import re

from PIL import Image

from diffuser_api.config import Settings
from diffuser_api.domain import STEP_CACHE_OFF, Capabilities, Endpoint, ImageRequest, StepCache, StepCacheMethod, Task
from diffuser_api.domain.requests import MAX_SEED
from diffuser_api.errors import InvalidRequest

# ASCII digits, the whole string: "６４x64" (full-width digits) or "64x64\n" is no size.
SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
EXTRA_PARAMETERS = ("guidance_scale", "true_cfg_scale", "negative_prompt", "strength")


def output_format_of(request: ImageRequest) -> str:
    return request.output_format or "png"


def check_request(request: ImageRequest, task: Task, caps: Capabilities, owner: str, settings: Settings) -> None:
    """Refuse, naming the parameter, whatever the model would ignore or cannot take."""
    if request.endpoint is not Endpoint.VARIATIONS and not (request.prompt or "").strip():
        raise InvalidRequest(
            "prompt is required and must not be empty", param="prompt", code="missing_required_parameter"
        )
    if request.n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}", param="n", code="invalid_value")
    if request.seed is not None and request.seed + request.n - 1 > MAX_SEED:
        raise InvalidRequest(
            f"seed {request.seed} with n={request.n} runs past the largest seed {MAX_SEED} (image k uses seed + k); "
            f"send a seed of at most {MAX_SEED - request.n + 1}",
            param="seed",
            code="invalid_value",
        )
    if request.stream and request.response_format == "url":
        raise InvalidRequest(
            "streamed images always come as b64_json; leave out response_format=url",
            param="response_format",
            code="invalid_value",
        )
    if request.partial_images and not request.stream:
        raise InvalidRequest(
            "partial_images needs stream=true: previews are only sent as stream events",
            param="partial_images",
            code="invalid_value",
        )
    if request.input_fidelity == "high" and "strength" not in caps.extras_for(task):
        raise InvalidRequest(
            f"input_fidelity=high has no effect on {owner} for {task.value}: it lowers the edit strength, "
            "which this pipeline does not take",
            param="input_fidelity",
            code="invalid_value",
        )
    if request.background == "transparent":
        raise InvalidRequest(
            f"background=transparent is not supported: {owner} makes opaque images",
            param="background",
            code="invalid_value",
        )
    if output_format_of(request) == "png" and request.output_compression not in (None, 100):
        raise InvalidRequest(
            "output_compression applies to jpeg and webp only; PNG is lossless",
            param="output_compression",
            code="invalid_value",
        )
    if request.quality is not None and request.quality not in settings.quality_step_factors:
        allowed = ", ".join(settings.quality_step_factors)
        raise InvalidRequest(f"quality must be one of {allowed}", param="quality", code="invalid_value")
    if task is Task.GENERATION and request.strength is not None:
        raise InvalidRequest(
            "strength applies to edits and variations, not generations", param="strength", code="unsupported_parameter"
        )
    for name in EXTRA_PARAMETERS:
        if getattr(request, name) is not None and name not in caps.extras_for(task):
            raise InvalidRequest(
                f"{name} is not used by {owner} for {task.value}; leave it out",
                param=name,
                code="unsupported_parameter",
            )
    if len(request.images) > caps.max_input_images:
        raise InvalidRequest(
            f"{owner} takes at most {caps.max_input_images} input images; got {len(request.images)}",
            param="image",
            code="invalid_value",
        )


def resolve_guidance(
    request: ImageRequest, task: Task, caps: Capabilities, owner: str
) -> tuple[float | None, float | None, str | None]:
    """Guidance scale, true CFG scale and negative prompt with defaults filled, refusing a
    negative prompt its guidance would ignore and true CFG with nothing to contrast.

    Defaults come from the capabilities alone: the model's own defaults (its models-file entry,
    or the global settings it inherits) are folded into them when the model is probed."""
    extras = caps.extras_for(task)
    guidance = request.guidance_scale
    if guidance is None and "guidance_scale" in extras:
        guidance = caps.default_guidance_scale
    true_cfg = request.true_cfg_scale
    if true_cfg is None and "true_cfg_scale" in extras:
        true_cfg = caps.default_true_cfg_scale
    negative = request.negative_prompt or None
    if negative is None and request.true_cfg_scale is None:
        negative = caps.default_negative_prompt
    scale_name = caps.negative_prompt_scale
    scale = {"guidance_scale": guidance, "true_cfg_scale": true_cfg}.get(scale_name or "")
    if request.negative_prompt and (scale is None or scale <= 1):
        raise InvalidRequest(
            f"negative_prompt has no effect on {owner} unless {scale_name} is above 1; raise it or leave "
            "negative_prompt out",
            param="negative_prompt",
            code="invalid_value",
        )
    if scale_name == "true_cfg_scale" and request.true_cfg_scale and request.true_cfg_scale > 1 and not negative:
        raise InvalidRequest(
            f"true_cfg_scale above 1 needs a negative_prompt on {owner}: true CFG contrasts the prompt with it "
            'and diffusers silently skips it without one; send negative_prompt (" " will do)',
            param="true_cfg_scale",
            code="invalid_value",
        )
    return guidance, true_cfg, negative


def resolve_step_cache(request: ImageRequest, caps: Capabilities, owner: str) -> StepCache:
    """The request's cache method, else the model's default. A method the model's denoiser
    cannot use is refused (a UNet family, SD3, a compiled model). The model's configured
    knob applies when the request picks the model's own method; another method runs with
    diffusers' defaults."""
    if request.step_cache is None:
        return caps.default_step_cache
    method = StepCacheMethod(request.step_cache)
    if method is StepCacheMethod.OFF:
        return STEP_CACHE_OFF
    if method not in caps.step_caches:
        offered = ", ".join(["off", *sorted(caps.step_caches)])
        raise InvalidRequest(
            f"step_cache '{method}' is not available on {owner}; choose one of: {offered}",
            param="step_cache",
            code="unsupported_parameter",
        )
    if method is caps.default_step_cache.method:
        return caps.default_step_cache
    return StepCache(method)


def resolve_size(request: ImageRequest, caps: Capabilities, images: list[Image.Image], owner: str) -> tuple[int, int]:
    """The requested size, checked against the family's rules; ``auto`` is the native or input size."""
    if request.size in (None, "auto"):
        if images:
            return caps.size.fit(*images[0].size)
        return caps.size.default_width, caps.size.default_height
    match = SIZE_PATTERN.fullmatch(request.size)
    if match is None:
        raise InvalidRequest(
            f"size '{request.size}' is not auto or {caps.size.describe()}", param="size", code="invalid_value"
        )
    width, height = int(match[1]), int(match[2])
    caps.size.check(width, height, requested=request.size, owner=owner)
    return width, height


def resolve_steps(request: ImageRequest, caps: Capabilities, settings: Settings) -> int:
    """``num_inference_steps`` when given, else the default steps scaled by the quality preset;
    either way at most ``max_steps``, so a preset cannot buy more steps than a number could."""
    if request.num_inference_steps is not None:
        if request.num_inference_steps > settings.max_steps:
            raise InvalidRequest(
                f"num_inference_steps must be at most {settings.max_steps}; got {request.num_inference_steps}",
                param="num_inference_steps",
                code="invalid_value",
            )
        return request.num_inference_steps
    base = caps.default_steps
    factor = settings.quality_step_factors.get(request.quality or "auto", 1.0)
    steps = max(1, round(base * factor))
    if steps > settings.max_steps:
        named = f"quality '{request.quality}'" if request.quality else "the default"
        raise InvalidRequest(
            f"{named} means {steps} steps, over the limit of {settings.max_steps}; "
            "send a lower quality or num_inference_steps",
            param="quality" if request.quality else "num_inference_steps",
            code="invalid_value",
        )
    return steps


def check_cost(n: int, width: int, height: int, steps: int, settings: Settings) -> None:
    """The cost cap of one request: ``n x width x height x steps`` at most ``max_pixel_steps``.

    Names ``n`` when fewer images would fit (and says how many), else ``size``: a single image
    of that size and steps is over the cap on its own.
    """
    cost = n * width * height * steps
    if cost <= settings.max_pixel_steps:
        return
    per_image = width * height * steps
    if per_image <= settings.max_pixel_steps:
        raise InvalidRequest(
            f"{n} images of {width}x{height} with {steps} steps is {cost} pixel-steps (n x width x height x steps), "
            f"over the limit of {settings.max_pixel_steps} per request; n can be at most "
            f"{settings.max_pixel_steps // per_image} at this size and steps",
            param="n",
            code="invalid_value",
        )
    raise InvalidRequest(
        f"one {width}x{height} image with {steps} steps is {per_image} pixel-steps (width x height x steps), "
        f"over the limit of {settings.max_pixel_steps} per request; ask for a smaller size or fewer steps",
        param="size",
        code="invalid_value",
    )


def resolve_strength(
    request: ImageRequest, task: Task, caps: Capabilities, steps: int, variation_strength: float
) -> float | None:
    """How much of the input an edit or variation changes (a variation: the model's
    ``variation_strength``); refuses one that runs no step."""
    if task is Task.GENERATION or "strength" not in caps.extras_for(task):
        return None
    strength = request.strength
    if strength is None:
        if task is Task.VARIATION:
            strength = variation_strength
        else:
            strength = caps.default_strength
            # High input fidelity keeps more of the input: change less of it.
            if request.input_fidelity == "high" and strength is not None:
                strength = strength * 0.6
    if strength is not None and int(steps * strength) < 1:
        raise InvalidRequest(
            f"strength {strength:g} x {steps} steps runs no denoising step; raise strength or num_inference_steps",
            param="strength",
            code="invalid_value",
        )
    return strength


def task_of(request: ImageRequest) -> Task:
    if request.endpoint is Endpoint.GENERATIONS:
        return Task.GENERATION
    if request.endpoint is Endpoint.VARIATIONS:
        return Task.VARIATION
    if len(request.images) > 1:
        return Task.MULTI_IMAGE_EDIT
    return Task.MASKED_EDIT if request.mask is not None else Task.EDIT
