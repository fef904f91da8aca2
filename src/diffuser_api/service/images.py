"""The image use cases the routers call: check a request against the model, run it, encode it."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from PIL import Image

from diffuser_api.config import Settings
from diffuser_api.domain import (
    Capabilities,
    Endpoint,
    GeneratedImage,
    ImageJob,
    ImageRequest,
    ImagesResult,
    StoredImage,
    Task,
)
from diffuser_api.domain.timeline import Timeline
from diffuser_api.engine.job import JobTiming
from diffuser_api.errors import InvalidRequest, NotSupported
from diffuser_api.models.registry import ModelHandle, ModelRegistry
from diffuser_api.service.encoding import encode_image
from diffuser_api.service.storage import ImageStorage
from diffuser_api.service.streaming import ImageStream, job_events
from diffuser_api.service.uploads import UploadLimits, decode_image, decode_mask

SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Sizes and qualities OpenAI's response schema knows; others are left out of the echo.
RESPONSE_SIZES = {"1024x1024", "1024x1536", "1536x1024"}
RESPONSE_QUALITIES = {"low", "medium", "high"}
EXTRA_PARAMETERS = ("guidance_scale", "true_cfg_scale", "negative_prompt", "strength")
MAX_SEED = 2**32 - 1

T = TypeVar("T")
# Admission control (e.g. a per-key image budget), told how many images a valid request makes.
Admission = Callable[[int], Awaitable[None]]


class ImageService:
    def __init__(self, settings: Settings, registry: ModelRegistry, storage: ImageStorage) -> None:
        self._settings = settings
        self._registry = registry
        self._storage = storage
        self._limits = UploadLimits(settings.max_upload_bytes, settings.max_input_pixels)
        # Decoding uploads and encoding PNGs is CPU work that must block neither the event
        # loop nor a model worker.
        self._codec = ThreadPoolExecutor(max_workers=2, thread_name_prefix="codec")

    def close(self) -> None:
        self._codec.shutdown(wait=False, cancel_futures=True)

    async def create(
        self,
        request: ImageRequest,
        url_base: str,
        timing: JobTiming | None = None,
        timeline: Timeline | None = None,
        admit: Admission | None = None,
    ) -> tuple[ImagesResult, str]:
        """Run one request end to end; returns the result and the id of the model that ran it.

        ``timing`` is filled in even when the request fails, for the caller's log line;
        ``timeline`` gets the encoding and storage phases, for its trace; ``admit`` is told the
        image count once the request is known to be valid, before any work is queued.
        """
        handle = self._registry.resolve(request.model)
        job = await self.prepare(request, handle)
        if admit is not None:
            await admit(job.n)
        images = await handle.engine.submit(job, timing=timing)
        timeline = timeline or Timeline()
        stored = await asyncio.gather(
            *(self._off_loop(self._store, image, request, url_base, timeline) for image in images)
        )
        result = ImagesResult(
            created=int(time.time()),
            images=tuple(stored),
            output_format=self._output_format(request),
            size=f"{job.width}x{job.height}",
            quality=request.quality,
            steps=job.steps,
        )
        return result, handle.id

    async def open_stream(
        self,
        request: ImageRequest,
        timing: JobTiming | None = None,
        timeline: Timeline | None = None,
        admit: Admission | None = None,
    ) -> ImageStream:
        """Check and prepare now (so a bad request is a plain HTTP error), run when iterated."""
        handle = self._registry.resolve(request.model)
        job = await self.prepare(request, handle)
        if admit is not None:
            await admit(job.n)
        timeline = timeline or Timeline()

        async def encode_preview(image: Image.Image) -> str:
            return await self._off_loop(self._encode_preview, image, request, timeline)

        async def store(image: GeneratedImage) -> StoredImage:
            return await self._off_loop(self._store, image, request, "", timeline)

        return ImageStream(job, handle.id, job_events(handle.engine, job, encode_preview, store, timing))

    async def prepare(self, request: ImageRequest, handle: ModelHandle) -> ImageJob:
        caps = handle.capabilities
        task = _task_of(request)
        if task not in caps.tasks:
            offered = ", ".join(sorted(caps.tasks)) or "nothing"
            raise NotSupported(
                f"model '{handle.id}' ({caps.family}) cannot do {task.value}; it supports: {offered}",
                code="not_supported",
            )
        owner = f"model '{handle.id}' ({caps.family})"
        if task is Task.MULTI_IMAGE_EDIT and request.mask is not None:
            # No diffusers pipeline inpaints from several images; never drop the mask silently.
            raise NotSupported(
                f"{owner} cannot do a masked edit with several images; send one image with the mask, "
                "or several images without one",
                code="not_supported",
            )
        self._check_parameters(request, task, caps, owner)
        images, mask = await self._off_loop(self._decode_uploads, request, caps) if request.images else ([], None)
        width, height = self._size(request, caps, images, owner)
        images = tuple(image.resize((width, height), Image.Resampling.LANCZOS) for image in images)
        if mask is not None:
            mask = mask.resize((width, height), Image.Resampling.NEAREST)
        steps = self._steps(request, caps)
        strength = self._strength(request, task, caps, steps)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - request.n)
        guidance, true_cfg, negative = self._guidance(request, task, caps, owner)
        prompt = self._settings.variation_prompt if task is Task.VARIATION else (request.prompt or "")
        return ImageJob(
            task=task,
            prompt=prompt,
            width=width,
            height=height,
            steps=steps,
            seeds=tuple(seed + index for index in range(request.n)),
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            negative_prompt=negative,
            strength=strength,
            images=images,
            mask=mask,
            partial_images=(request.partial_images or 0) if request.stream else 0,
        )

    def _check_parameters(self, request: ImageRequest, task: Task, caps: Capabilities, owner: str) -> None:
        if request.endpoint is not Endpoint.VARIATIONS and not (request.prompt or "").strip():
            raise InvalidRequest(
                "prompt is required and must not be empty", param="prompt", code="missing_required_parameter"
            )
        if request.n > self._settings.max_n:
            raise InvalidRequest(f"n must be at most {self._settings.max_n}", param="n", code="invalid_value")
        if request.stream and request.response_format == "url":
            raise InvalidRequest(
                "streamed images always come as b64_json; leave out response_format=url",
                param="response_format",
                code="invalid_value",
            )
        if request.partial_images and not request.stream:
            raise InvalidRequest(
                "partial_images needs stream=true: previews are only sent as stream events",
                param="partial_images", code="invalid_value",
            )
        if request.input_fidelity == "high" and "strength" not in caps.extras_for(task):
            raise InvalidRequest(
                f"input_fidelity=high has no effect on {owner} for {task.value}: it lowers the edit strength, "
                "which this pipeline does not take",
                param="input_fidelity", code="invalid_value",
            )
        if request.background == "transparent":
            raise InvalidRequest(
                f"background=transparent is not supported: {owner} makes opaque images",
                param="background", code="invalid_value",
            )
        if self._output_format(request) == "png" and request.output_compression not in (None, 100):
            raise InvalidRequest(
                "output_compression applies to jpeg and webp only; PNG is lossless",
                param="output_compression",
                code="invalid_value",
            )
        if request.quality is not None and request.quality not in self._settings.quality_step_factors:
            allowed = ", ".join(self._settings.quality_step_factors)
            raise InvalidRequest(f"quality must be one of {allowed}", param="quality", code="invalid_value")
        if task is Task.GENERATION and request.strength is not None:
            raise InvalidRequest("strength applies to edits and variations, not generations",
                                 param="strength", code="unsupported_parameter")
        for name in EXTRA_PARAMETERS:
            if getattr(request, name) is not None and name not in caps.extras_for(task):
                raise InvalidRequest(
                    f"{name} is not used by {owner} for {task.value}; leave it out",
                    param=name, code="unsupported_parameter",
                )
        if len(request.images) > caps.max_input_images:
            raise InvalidRequest(
                f"{owner} takes at most {caps.max_input_images} input images; got {len(request.images)}",
                param="image", code="invalid_value",
            )

    def _decode_uploads(
        self, request: ImageRequest, caps: Capabilities
    ) -> tuple[list[Image.Image], Image.Image | None]:
        images = [decode_image(upload.data, param=upload.param, limits=self._limits) for upload in request.images]
        mask = None
        if request.mask is not None:
            mask = decode_mask(request.mask.data, image_size=images[0].size, limits=self._limits)
        return images, mask

    def _guidance(
        self, request: ImageRequest, task: Task, caps: Capabilities, owner: str
    ) -> tuple[float | None, float | None, str | None]:
        """Guidance scale, true CFG scale and negative prompt with defaults filled, refusing a
        negative prompt its guidance would ignore and true CFG with nothing to contrast."""
        extras = caps.extras_for(task)
        guidance = request.guidance_scale
        if guidance is None and "guidance_scale" in extras:
            guidance = self._settings.default_guidance_scale or caps.default_guidance_scale
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
                "negative_prompt out", param="negative_prompt", code="invalid_value",
            )
        if scale_name == "true_cfg_scale" and request.true_cfg_scale and request.true_cfg_scale > 1 and not negative:
            raise InvalidRequest(
                f"true_cfg_scale above 1 needs a negative_prompt on {owner}: true CFG contrasts the prompt with it "
                "and diffusers silently skips it without one; send negative_prompt (\" \" will do)",
                param="true_cfg_scale", code="invalid_value",
            )
        return guidance, true_cfg, negative

    def _size(
        self, request: ImageRequest, caps: Capabilities, images: list[Image.Image], owner: str
    ) -> tuple[int, int]:
        if request.size in (None, "auto"):
            if images:
                return caps.size.fit(*images[0].size)
            return caps.size.default_width, caps.size.default_height
        match = SIZE_PATTERN.match(request.size)
        if match is None:
            raise InvalidRequest(
                f"size '{request.size}' is not auto or {caps.size.describe()}", param="size", code="invalid_value"
            )
        width, height = int(match[1]), int(match[2])
        caps.size.check(width, height, requested=request.size, owner=owner)
        return width, height

    def _steps(self, request: ImageRequest, caps: Capabilities) -> int:
        if request.num_inference_steps is not None:
            return request.num_inference_steps
        base = self._settings.default_steps or caps.default_steps
        factor = self._settings.quality_step_factors.get(request.quality or "auto", 1.0)
        return max(1, round(base * factor))

    def _strength(self, request: ImageRequest, task: Task, caps: Capabilities, steps: int) -> float | None:
        if task is Task.GENERATION or "strength" not in caps.extras_for(task):
            return None
        strength = request.strength
        if strength is None:
            if task is Task.VARIATION:
                strength = self._settings.variation_strength
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

    def _output_format(self, request: ImageRequest) -> str:
        return request.output_format or "png"

    def _store(self, image: GeneratedImage, request: ImageRequest, url_base: str, timeline: Timeline) -> StoredImage:
        """Encoding includes base64 for b64_json answers; only url answers are stored."""
        output_format = self._output_format(request)
        common = {"seed": image.seed, "revised_prompt": image.revised_prompt}
        with timeline.phase("encoding", seed=image.seed, output_format=output_format):
            data = encode_image(image.image, output_format, request.output_compression)
            if request.response_format != "url":
                return StoredImage(b64_json=base64.b64encode(data).decode("ascii"), **common)
        with timeline.phase("storage", seed=image.seed, bytes=len(data)):
            name = self._storage.save(data, output_format)
            return StoredImage(url=self._storage.url(name, url_base), **common)

    def _encode_preview(self, image: Image.Image, request: ImageRequest, timeline: Timeline) -> str:
        output_format = self._output_format(request)
        with timeline.phase("encoding", preview=True, output_format=output_format):
            data = encode_image(image, output_format, request.output_compression, quick=True)
            return base64.b64encode(data).decode("ascii")

    async def _off_loop(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._codec, function, *args)


def _task_of(request: ImageRequest) -> Task:
    if request.endpoint is Endpoint.GENERATIONS:
        return Task.GENERATION
    if request.endpoint is Endpoint.VARIATIONS:
        return Task.VARIATION
    if len(request.images) > 1:
        return Task.MULTI_IMAGE_EDIT
    return Task.MASKED_EDIT if request.mask is not None else Task.EDIT


def response_size(size: str) -> str | None:
    return size if size in RESPONSE_SIZES else None


def response_quality(quality: str | None) -> str | None:
    return quality if quality in RESPONSE_QUALITIES else None
