"""What a loaded model can do, derived once from its pipeline and checked before queueing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from diffuser_api.domain.requests import Task
from diffuser_api.domain.speed import STEP_CACHE_OFF, StepCache, StepCacheMethod
from diffuser_api.errors import InvalidRequest


@dataclass(frozen=True)
class SizeRules:
    multiple: int
    min_side: int
    max_side: int
    default_width: int
    default_height: int

    def describe(self) -> str:
        return f"WxH with multiples of {self.multiple} between {self.min_side} and {self.max_side}"

    def check(self, width: int, height: int, *, requested: str, owner: str = "") -> None:
        """``owner`` names the model and family whose rule this is, for the error message."""
        ok_range = all(self.min_side <= side <= self.max_side for side in (width, height))
        if not ok_range or width % self.multiple or height % self.multiple:
            suffix = f" for {owner}" if owner else ""
            raise InvalidRequest(
                f"size '{requested}' is not {self.describe()}{suffix}", param="size", code="invalid_value"
            )

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The nearest allowed size to an input image's, for ``size=auto`` on edits."""

        # Bounds come from settings and need not be multiples, so snap to the multiples inside them.
        lowest = max(self.multiple, -(-self.min_side // self.multiple) * self.multiple)
        highest = self.max_side // self.multiple * self.multiple

        def snap(side: int) -> int:
            return max(lowest, min(highest, round(side / self.multiple) * self.multiple))

        return snap(width), snap(height)


@dataclass(frozen=True)
class PreviewPlan:
    """How streamed previews of this model are made, for ``GET /v1/models/{id}``.

    ``latent``: a fixed linear map of the latent channels to RGB (nearly free); ``vae``: a VAE
    decode of downscaled latents. ``method`` says how, and why not by the latent map when not.
    """

    mode: str
    method: str


@dataclass(frozen=True)
class Capabilities:
    """The contract between a model and the service.

    ``extras`` names the diffusers parameters the model honours; any other one, sent with a
    value that would change the result, is refused with a 400 naming it. ``task_extras``
    narrows that per task where the task's pipeline takes fewer (Qwen-Image-Edit takes
    ``strength`` for masked edits only).

    ``negative_prompt_scale`` names the scale that must exceed 1 for a negative prompt to
    count: ``guidance_scale`` (classifier-free guidance) or ``true_cfg_scale`` (true CFG, which
    also does nothing without a negative prompt); ``None`` if the model takes no negative prompt.
    """

    family: str
    tasks: frozenset[Task]
    extras: frozenset[str]
    size: SizeRules
    default_steps: int
    default_guidance_scale: float | None
    default_strength: float | None
    variation_method: str | None
    max_input_images: int = 1
    notes: tuple[str, ...] = field(default=())
    task_extras: Mapping[Task, frozenset[str]] = field(default_factory=dict)
    default_true_cfg_scale: float | None = None
    default_negative_prompt: str | None = None
    negative_prompt_scale: str | None = "guidance_scale"
    previews: PreviewPlan = PreviewPlan("vae", "decoded with the model's VAE")
    # Whether the pipeline can load LoRA adapters (diffusers' ``load_lora_weights``).
    lora: bool = False
    # Step-cache methods a request may pick (``off`` always may), and what it gets by default.
    step_caches: frozenset[StepCacheMethod] = frozenset()
    default_step_cache: StepCache = STEP_CACHE_OFF

    def extras_for(self, task: Task) -> frozenset[str]:
        return self.task_extras.get(task, self.extras)

    def without(self, disabled: frozenset[Task]) -> Capabilities:
        """Settings may switch tasks off, never on."""
        return Capabilities(**{**self.__dict__, "tasks": self.tasks - disabled})
