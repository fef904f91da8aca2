"""The image use cases the routers call: check a request against the model, run it, encode it."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Awaitable, Callable

from PIL import Image

from diffuser_api.config import Settings
from diffuser_api.domain import (
    Capabilities,
    EncodedPreview,
    GeneratedImage,
    ImageJob,
    ImageRequest,
    ImagesResult,
    StoredImage,
    Task,
)
from diffuser_api.domain.devices import is_cpu
from diffuser_api.domain.requests import MAX_SEED
from diffuser_api.domain.timeline import Timeline
from diffuser_api.engine.job import JobTiming, WorkerEncoders
from diffuser_api.errors import NotSupported
from diffuser_api.models.registry import ModelRegistry, ServedModel
from diffuser_api.models.spec import PresetSpec
from diffuser_api.service.codec_pool import CodecPool
from diffuser_api.service.encoding import encode_image
from diffuser_api.service.loras import resolve_loras, with_preset_defaults
from diffuser_api.service.storage import ImageStorage
from diffuser_api.service.streaming import ImageStream, leased_job_events
from diffuser_api.service.uploads import UploadLimits, decode_image, decode_mask
from diffuser_api.service.validation import (
    check_cost,
    check_request,
    output_format_of,
    resolve_guidance,
    resolve_size,
    resolve_step_cache,
    resolve_steps,
    resolve_strength,
    task_of,
)

# Sizes and qualities OpenAI's response schema knows; others are left out of the echo.
RESPONSE_SIZES = {"1024x1024", "1024x1536", "1536x1024"}
RESPONSE_QUALITIES = {"low", "medium", "high"}

# Admission control (e.g. a per-key image budget), told how many images a valid request makes.
Admission = Callable[[int], Awaitable[None]]
# Two threads: decoding and encoding are short, and the model workers need the CPU more.
CODEC_THREADS = 2
# Pillow's resize first shrinks by an integer factor while the image stays above this many
# times the output, then resamples: far less work on a large input, the same picture.
REDUCING_GAP = 3.0


BACKGROUND_NICENESS = 10


class ImageService:
    def __init__(self, settings: Settings, registry: ModelRegistry, storage: ImageStorage) -> None:
        self._settings = settings
        self._registry = registry
        self._storage = storage
        self._limits = UploadLimits(settings.max_upload_bytes, settings.max_input_pixels)
        self.codec = CodecPool(CODEC_THREADS, settings.max_codec_queue)
        # Async jobs' and batch lines' images: nobody waits on an open connection for them, so
        # their encoding must not take the cores from an interactive request's pipeline call.
        self.background_codec = CodecPool(CODEC_THREADS, settings.max_codec_queue, niceness=BACKGROUND_NICENESS)

    def close(self) -> None:
        self.codec.close()
        self.background_codec.close()

    async def create(
        self,
        request: ImageRequest,
        url_base: str,
        timing: JobTiming | None = None,
        timeline: Timeline | None = None,
        admit: Admission | None = None,
        allowed: frozenset[str] | None = None,
    ) -> tuple[ImagesResult, str]:
        """Run one request end to end; returns the result and the id of the model that ran it.

        ``timing`` is filled in even when the request fails, for the caller's log line;
        ``timeline`` gets the encoding and storage phases, for its trace; ``admit`` is told the
        image count once the request is known to be valid, before any upload is decoded;
        ``allowed`` (the caller's key's models) hides every other model. The request is checked
        against the model's capabilities before the model is loaded: a refusal costs no load.
        """
        route = self._registry.route(request.model, allowed)
        model = route.model
        job = await self.prepare(request, model, admit, preset=route.preset)
        deadline = time.monotonic() + model.spec.engine.request_timeout_s
        timeline = timeline or Timeline()
        async with self._registry.lease(model, deadline=deadline) as engine:
            images = await engine.submit(job, timing=timing, deadline=deadline,
                                         encoders=self.worker_encoders(model, request, timeline))
        stored = await asyncio.gather(
            *(self.codec.run_admitted(self._store, image, request, url_base, timeline) for image in images)
        )
        result = ImagesResult(
            created=int(time.time()),
            images=tuple(stored),
            output_format=output_format_of(request),
            size=f"{job.width}x{job.height}",
            quality=request.quality,
            steps=job.steps,
            prompt_tokens=images[0].prompt_tokens if images else None,
        )
        return result, model.id

    async def open_stream(
        self,
        request: ImageRequest,
        timing: JobTiming | None = None,
        timeline: Timeline | None = None,
        admit: Admission | None = None,
        allowed: frozenset[str] | None = None,
    ) -> ImageStream:
        """Check and prepare now (so a bad request is a plain HTTP error), run when iterated:
        the model is leased (and loaded if need be) inside the events, after the 200."""
        route = self._registry.route(request.model, allowed)
        model = route.model
        job = await self.prepare(request, model, admit, preset=route.preset)
        self._registry.check_room(model)  # a loaded model's full queue is a plain 429 still
        timeline = timeline or Timeline()

        async def encode_preview(image: Image.Image) -> str:
            return await self.codec.run_admitted(self._encode_preview, image, request, timeline)

        async def store(image: GeneratedImage) -> StoredImage:
            return await self.codec.run_admitted(self._store, image, request, "", timeline)

        events = leased_job_events(self._registry, model, job, encode_preview, store, timing,
                                   self.worker_encoders(model, request, timeline))
        return ImageStream(job, model.id, events)

    def worker_encoders(self, model: ServedModel, request: ImageRequest, timeline: Timeline | None = None, *,
                        previews: bool = True) -> WorkerEncoders | None:
        """On a CPU the pipeline's threads hold every core: its worker encodes the request's
        images after the call and, with ``previews``, its previews between steps (see
        ``WorkerEncoders``). On a GPU (None) the codec pool encodes them on the free host cores."""
        if not model.devices or not all(is_cpu(device) for device in model.devices):
            return None
        timeline = timeline or Timeline()
        return WorkerEncoders(
            result=lambda image: self._encode_result(image, request, timeline),
            preview=(lambda image: EncodedPreview(self._encode_preview(image, request, timeline))) if previews
            else None,
        )

    async def prepare(
        self, request: ImageRequest, model: ServedModel, admit: Admission | None = None,
        preset: PresetSpec | None = None,
    ) -> ImageJob:
        """Check the request, charge it to ``admit``, then decode its uploads.

        Every check that needs no pixels comes first, so an invalid request is not charged; the
        charge comes before decoding, so a caller over budget costs no decode work. A ``preset``
        (the request named one) brings its defaults and LoRAs, each unless the request sends its own.
        """
        caps = model.capabilities
        if preset is not None:
            caps = with_preset_defaults(caps, preset.defaults, f"preset '{preset.id}'")
        task = task_of(request)
        if task not in caps.tasks:
            offered = ", ".join(sorted(caps.tasks)) or "nothing"
            raise NotSupported(
                f"model '{model.id}' ({caps.family}) cannot do {task.value}; it supports: {offered}",
                code="not_supported",
            )
        owner = f"model '{model.id}' ({caps.family})"
        if task is Task.MULTI_IMAGE_EDIT and request.mask is not None:
            # No diffusers pipeline inpaints from several images; never drop the mask silently.
            raise NotSupported(
                f"{owner} cannot do a masked edit with several images; send one image with the mask, "
                "or several images without one",
                code="not_supported",
            )
        check_request(request, task, caps, owner, self._settings)
        # An edit's size=auto is its first upload's, known once decoded; any other is checked now.
        size = None if request.images and request.size in (None, "auto") else resolve_size(request, caps, [], owner)
        steps = resolve_steps(request, caps, self._settings)
        if size is not None:
            check_cost(request.n, *size, steps, self._settings)
        strength = resolve_strength(request, task, caps, steps, model.spec.variation_strength)
        guidance, true_cfg, negative = resolve_guidance(request, task, caps, owner)
        loras = resolve_loras(request, preset, caps, model.spec.adapters, owner, self._settings)
        step_cache = resolve_step_cache(request, caps, owner)
        if admit is not None:
            await admit(request.n)
        if request.images:
            images, mask, (width, height) = await self.codec.run(self._decode_uploads, request, caps, owner, size)
            if size is None:  # size=auto: the cost is known only now, from the first upload
                check_cost(request.n, width, height, steps, self._settings)
        else:
            images, mask, (width, height) = (), None, size
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - request.n)
        prompt = model.spec.variation_prompt if task is Task.VARIATION else (request.prompt or "")
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
            step_cache=step_cache,
            images=images,
            mask=mask,
            partial_images=(request.partial_images or 0) if request.stream else 0,
            loras=loras,
        )

    def _decode_uploads(
        self, request: ImageRequest, caps: Capabilities, owner: str, size: tuple[int, int] | None
    ) -> tuple[tuple[Image.Image, ...], Image.Image | None, tuple[int, int]]:
        """The uploads decoded and resized to the output ``size`` (from the first one's when None).

        A JPEG is decoded at reduced scale when the output size is known and no mask has to
        match it at full size.
        """
        at_least = max(size) if size is not None and request.mask is None else None
        images = [
            decode_image(upload.data, param=upload.param, limits=self._limits, at_least=at_least)
            for upload in request.images
        ]
        mask = None
        if request.mask is not None:
            mask = decode_mask(request.mask.data, image_size=images[0].size, limits=self._limits)
        width, height = size or resolve_size(request, caps, images, owner)
        resized = tuple(
            image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP) for image in images
        )
        if mask is not None:
            mask = mask.resize((width, height), Image.Resampling.NEAREST)
        return resized, mask, (width, height)

    def _store(self, image: GeneratedImage, request: ImageRequest, url_base: str, timeline: Timeline) -> StoredImage:
        """Encoded (unless its worker did) and base64'd for b64_json answers; only url answers
        are stored."""
        output_format = output_format_of(request)
        common = {"seed": image.seed, "revised_prompt": image.revised_prompt}
        data = self.encoded(image, request, timeline)
        if request.response_format != "url":
            return StoredImage(b64_json=base64.b64encode(data).decode("ascii"), **common)
        with timeline.phase("storage", seed=image.seed, bytes=len(data)):
            name = self._storage.save(data, output_format)
            return StoredImage(url=self._storage.url(name, url_base), **common)

    def encoded(self, image: GeneratedImage, request: ImageRequest, timeline: Timeline | None = None) -> bytes:
        """The image in the request's output format: as its worker encoded it, else encoded here."""
        if image.encoded is not None:
            return image.encoded
        return self._encode_result(image, request, timeline or Timeline())

    def _encode_result(self, image: GeneratedImage, request: ImageRequest, timeline: Timeline) -> bytes:
        output_format = output_format_of(request)
        with timeline.phase("encoding", seed=image.seed, output_format=output_format):
            return encode_image(image.image, output_format, request.output_compression)

    def _encode_preview(self, image: Image.Image, request: ImageRequest, timeline: Timeline) -> str:
        output_format = output_format_of(request)
        with timeline.phase("encoding", preview=True, output_format=output_format):
            data = encode_image(image, output_format, request.output_compression, quick=True)
            return base64.b64encode(data).decode("ascii")



def response_size(size: str) -> str | None:
    return size if size in RESPONSE_SIZES else None


def response_quality(quality: str | None) -> str | None:
    return quality if quality in RESPONSE_QUALITIES else None
