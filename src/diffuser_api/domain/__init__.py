"""Plain request, capability and result types shared by every layer (no HTTP, no torch)."""

from diffuser_api.domain.capabilities import Capabilities, SizeRules
from diffuser_api.domain.requests import AdapterSet, Endpoint, ImageJob, ImageRequest, LoraChoice, Task, Upload
from diffuser_api.domain.results import EncodedPreview, GeneratedImage, ImagesResult, StepProgress, StoredImage
from diffuser_api.domain.speed import (
    STEP_CACHE_OFF,
    CpuOffload,
    MemoryOptions,
    Quantization,
    SpeedOptions,
    StepCache,
    StepCacheMethod,
)

__all__ = [
    "AdapterSet",
    "LoraChoice",
    "STEP_CACHE_OFF",
    "CpuOffload",
    "MemoryOptions",
    "Quantization",
    "SpeedOptions",
    "StepCache",
    "StepCacheMethod",
    "Capabilities",
    "Endpoint",
    "ImageRequest",
    "Upload",
    "GeneratedImage",
    "ImageJob",
    "ImagesResult",
    "SizeRules",
    "EncodedPreview",
    "StepProgress",
    "StoredImage",
    "Task",
]
