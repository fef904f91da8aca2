"""LoRA adapters on the real tiny pipelines of four families, loaded with diffusers' own
``load_lora_weights`` from files peft wrote: an adapter changes the pixels, scale 0 (and no
adapter) is the base image, and a hundred switches leave the base model as it was."""

from __future__ import annotations

import numpy as np
import pytest

from diffuser_api.config import Settings
from diffuser_api.domain import ImageJob, Task
from diffuser_api.models.loading import load_model
from diffuser_api.models.spec import AdapterSpec, ModelSpec
from tests.conftest import TINY_CACHE

pytestmark = pytest.mark.slow


def loaded(model_id: str, tiny_lora, **spec):
    adapters = (AdapterSpec("first", str(tiny_lora(model_id, 1))),
                AdapterSpec("second", str(tiny_lora(model_id, 2)), scale=0.5))
    settings = Settings(_env_file=None, cache_dir=TINY_CACHE)
    return load_model(ModelSpec(id=model_id, source=model_id, devices=("cpu",), adapters=adapters, **spec), settings)


def pixels(model, loras=(), steps: int = 2) -> np.ndarray:
    job = ImageJob(task=Task.GENERATION, prompt="a fox", width=64, height=64, steps=steps, seeds=(7,), loras=loras)
    (runner,) = model.runners
    (image,), = runner.run([job], lambda step, total, previews: None)
    return np.asarray(image.image, dtype=np.int16)


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-qwen-image"])
def test_an_adapter_changes_the_pixels_and_scale_zero_is_the_base_image(model_id, tiny_lora):
    model = loaded(model_id, tiny_lora)
    base = pixels(model)
    first = pixels(model, (("first", 1.0),))
    both = pixels(model, (("first", 1.0), ("second", 0.5)))
    assert np.abs(first - base).mean() > 1, "the adapter changed nothing"
    assert np.abs(both - first).mean() > 0.5, "the second adapter changed nothing"
    assert np.array_equal(pixels(model, (("first", 0.0),)), base)  # set_adapters at weight 0
    assert np.array_equal(pixels(model), base)  # adapters off again: the base model, exactly
    assert np.array_equal(pixels(model, (("first", 1.0),)), first)
    assert model.loaded_adapters() == ("first", "second")
    assert model.adapter_bytes()["cpu"] > 0


def test_a_hundred_alternating_calls_leave_the_base_model_unchanged(tiny_lora):
    model = loaded("tiny-sd", tiny_lora)
    base = pixels(model, steps=1)
    first = pixels(model, (("first", 1.5),), steps=1)
    sets = [(("first", 1.5),), (), (("first", 0.7), ("second", -1.0)), (("second", 2.0),)]
    for call in range(100):
        pixels(model, sets[call % len(sets)], steps=1)
    assert np.array_equal(pixels(model, steps=1), base)
    assert np.array_equal(pixels(model, (("first", 1.5),), steps=1), first)


def test_the_lru_unloads_the_least_recently_used_adapter(tiny_lora):
    model = loaded("tiny-sd", tiny_lora, max_loaded_adapters=1)
    first = pixels(model, (("first", 1.0),))
    one = model.adapter_bytes()["cpu"]
    pixels(model, (("second", 1.0),))
    assert model.loaded_adapters() == ("second",)
    assert model.adapter_bytes()["cpu"] == one  # same rank and layers: the same size
    assert np.array_equal(pixels(model, (("first", 1.0),)), first)  # loaded again, the same adapter
    assert model.loaded_adapters() == ("first",)
