"""LoRA hot-swap on a compiled tiny SD: switching adapters gives the uncompiled model's pixels and
compiles no new graph (counted, never timed); what hot-swap cannot serve is refused at start-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffuser_api.config import Settings
from diffuser_api.config.models_file import ModelsFileError
from diffuser_api.domain import ImageJob, SpeedOptions, Task
from diffuser_api.models.checkpoint import probe_model
from diffuser_api.models.loading import load_model
from diffuser_api.models.registry import LoadedRunners, warm_up
from diffuser_api.models.spec import AdapterSpec, ModelSpec
from tests.conftest import TINY_CACHE

pytestmark = pytest.mark.slow

# Two slots for three adapters, so switching among them evicts and hot-swaps.
SETTINGS = Settings(_env_file=None, cache_dir=TINY_CACHE, max_loras_per_request=2)


def sd_spec(adapters: tuple[AdapterSpec, ...], compile: bool) -> ModelSpec:
    return ModelSpec(id="tiny-sd", source="tiny-sd", devices=("cpu",), adapters=adapters,
                     speed=SpeedOptions(compile=compile))


def pixels(model, loras=()) -> np.ndarray:
    job = ImageJob(task=Task.GENERATION, prompt="a fox", width=64, height=64, steps=2, seeds=(7,), loras=loras,
                   guidance_scale=7.5)
    (image,), = model.runners[0].run([job], lambda step, total, previews: None)
    return np.asarray(image.image, dtype=np.int16)


def test_switching_adapters_on_a_compiled_unet_matches_the_uncompiled_model_and_compiles_nothing(tiny_lora):
    adapters = (
        AdapterSpec("first", str(tiny_lora("tiny-sd", 1))),
        # Fewer layers than the slots hold (the rest stay zero) ...
        AdapterSpec("second", str(tiny_lora("tiny-sd", 2, target_modules=["to_q", "to_k"])), scale=0.5),
        # ... and a larger rank (the slots are padded to it).
        AdapterSpec("third", str(tiny_lora("tiny-sd", 3, rank=8))),
    )
    sets = [(), (("first", 1.0),), (("second", 0.5),), (("third", 1.0),), (("first", 0.7), ("third", -1.0)),
            (("second", 2.0),), (("first", 0.0),), ()]
    uncompiled = load_model(sd_spec(adapters, compile=False), SETTINGS)
    expected = [pixels(uncompiled, loras) for loras in sets]
    del uncompiled

    compiled_spec = sd_spec(adapters, compile=True)
    model = load_model(compiled_spec, SETTINGS)
    warm_up(LoadedRunners(probe_model(compiled_spec, SETTINGS).capabilities, model.runners, model.pipeline_class),
            sizes=2)
    graphs = torch._dynamo.utils.counters["stats"]
    compiled_graphs = graphs["unique_graphs"]
    for loras, want in zip(sets, expected, strict=True):
        got = pixels(model, loras)
        assert np.abs(got - want).max() <= 1, f"{loras}: compiled pixels differ from the uncompiled model's"
        if loras and loras[0][1]:
            assert np.abs(got - expected[0]).mean() > 0.3, f"{loras} changed nothing"
    # Three adapters through two slots, least recently used first: 'first' was swapped out and back in.
    assert model.loaded_adapters() == ("second", "first")
    assert graphs["unique_graphs"] == compiled_graphs, "switching adapters recompiled"


def test_adapters_targeting_different_layers_are_refused_at_start_up(tiny_lora):
    adapters = (
        AdapterSpec("queries", str(tiny_lora("tiny-sd", 4, target_modules=["to_q", "to_k"]))),
        AdapterSpec("values", str(tiny_lora("tiny-sd", 5, target_modules=["to_v", "to_out.0"]))),
    )
    with pytest.raises(ModelsFileError) as refused:
        load_model(sd_spec(adapters, compile=True), SETTINGS)
    message = str(refused.value)
    assert message.startswith("model 'tiny-sd': with speed.compile, LoRA adapters are hot-swapped into fixed layers")
    assert "'queries' and 'values' target different layers" in message
    assert "to_v" in message or "to_out" in message


def test_an_adapter_that_cannot_load_is_refused_at_start_up_without_its_path(tmp_path, tiny_lora):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    adapters = (AdapterSpec("fine", str(tiny_lora("tiny-sd", 1))), AdapterSpec("broken", str(broken)))
    with pytest.raises(ModelsFileError, match="LoRA adapter 'broken' could not be loaded") as refused:
        load_model(sd_spec(adapters, compile=True), SETTINGS)
    assert str(tmp_path) not in str(refused.value)
