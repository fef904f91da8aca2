"""Queue, batching, cancellation and one worker thread per device. No web framework here."""

from diffuser_api.engine.engine import Engine, EngineLimits
from diffuser_api.engine.runner import ModelRunner, PreviewSource, StepCallback

__all__ = ["Engine", "EngineLimits", "ModelRunner", "PreviewSource", "StepCallback"]
