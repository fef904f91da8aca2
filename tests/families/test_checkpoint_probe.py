"""Capabilities read from a checkpoint's configs, without its weights, are those its loaded
pipeline has: for every tiny family, the probe matches what the loaded pipeline serves and
the sizes its own ``__init__`` computes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DiffusionPipeline, ModelMixin
from transformers import PreTrainedModel

from diffuser_api.config import Settings
from diffuser_api.config.models_file import ModelsFileError
from diffuser_api.domain import Task
from diffuser_api.models.checkpoint import probe_model, probe_pipeline
from diffuser_api.models.families import family_for
from diffuser_api.models.loading import load_model
from diffuser_api.models.spec import ModelDefaults, ModelSpec
from diffuser_api.models.tasks import task_extras
from diffuser_api.models.tiny import BUILDERS, ensure_tiny_model
from tests.conftest import TINY_CACHE

pytestmark = pytest.mark.slow

SETTINGS = Settings(_env_file=None, cache_dir=TINY_CACHE)


def refuse_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the probe loaded weights")

    for owner in (DiffusionPipeline, ModelMixin, PreTrainedModel):
        monkeypatch.setattr(owner, "from_pretrained", classmethod(refuse))


def probe(monkeypatch: pytest.MonkeyPatch, spec: ModelSpec):
    ensure_tiny_model(spec.source, TINY_CACHE)  # building a tiny model is not probing it
    with monkeypatch.context() as patched:
        refuse_weights(patched)
        return probe_model(spec, SETTINGS)


@pytest.mark.parametrize("model", BUILDERS)
def test_the_probe_gives_the_capabilities_of_the_loaded_pipeline(monkeypatch, model):
    spec = ModelSpec(id=model, source=model, devices=("cpu",))
    probed = probe(monkeypatch, spec)
    loaded = load_model(spec, SETTINGS)
    (runner,) = loaded.runners
    base = next(iter(runner.pipelines.values()))
    family = family_for(loaded.pipeline_class)

    assert probed.pipeline_class == loaded.pipeline_class == type(base).__name__
    assert probed == probe_pipeline(base, family, spec, SETTINGS)
    caps = probed.capabilities
    transformer = getattr(base, "transformer", None)
    # The tasks and extras are those of the pipelines the loaded model serves.
    assert caps.tasks == set(runner.pipelines)
    expected = task_extras({task: type(pipe) for task, pipe in runner.pipelines.items()}, family)
    if getattr(getattr(transformer, "config", None), "guidance_embeds", True) is False:
        expected = {task: names - {"guidance_scale"} for task, names in expected.items()}
    assert caps.task_extras == expected
    # The default size is the one the pipeline itself falls back to, the largest its position table covers.
    sample = getattr(base, "default_sample_size", None) or base.unet.config.sample_size
    native = min(SETTINGS.max_image_size, sample * base.vae_scale_factor)
    assert caps.size.default_width == caps.size.default_height == native - native % family.size_multiple
    largest = SETTINGS.max_image_size
    if transformer is not None and getattr(transformer.config, "pos_embed_max_size", None):
        table = transformer.config.pos_embed_max_size * transformer.config.patch_size * base.vae_scale_factor
        largest = min(largest, table)
    assert caps.size.max_side == largest - largest % family.size_multiple


def test_per_model_defaults_and_disabled_tasks_are_folded_into_the_capabilities(monkeypatch):
    plain = probe(monkeypatch, ModelSpec(id="a", source="tiny-sd")).capabilities
    spec = ModelSpec(
        id="b", source="tiny-sd", defaults=ModelDefaults(steps=4, guidance_scale=2.0, size=(64, 96)),
        disabled_tasks=frozenset({Task.EDIT, Task.VARIATION}),
    )
    caps = probe(monkeypatch, spec).capabilities
    assert (plain.default_steps, plain.default_guidance_scale) == (30, 7.5)
    assert (caps.default_steps, caps.default_guidance_scale) == (4, 2.0)
    assert (caps.size.default_width, caps.size.default_height) == (64, 96)
    assert caps.size.multiple == plain.size.multiple and caps.size.max_side == plain.size.max_side
    assert caps.tasks == plain.tasks - {Task.EDIT, Task.VARIATION} == {Task.GENERATION, Task.MASKED_EDIT}


@pytest.mark.parametrize("size", [(72, 64), (32, 64), (4096, 64)])
def test_a_default_size_the_family_refuses_is_a_start_up_error_naming_the_model(monkeypatch, size):
    spec = ModelSpec(id="edit", source="tiny-qwen-image-edit", defaults=ModelDefaults(size=size))
    with pytest.raises(ModelsFileError, match=(
        rf"model 'edit': defaults.size '{size[0]}x{size[1]}' is not WxH with multiples of 32 between 64 and 2048 "
        "for family qwen-image-edit"
    )):
        probe(monkeypatch, spec)


def test_the_loaded_model_reports_its_bytes_and_never_offloads_on_cpu():
    loaded = load_model(ModelSpec(id="sd", source="tiny-sd", devices=("cpu", "cpu")), SETTINGS)
    base = loaded.runners[0].pipelines[Task.GENERATION]
    expected = sum(
        tensor.numel() * tensor.element_size()
        for module in base.components.values() if isinstance(module, torch.nn.Module)
        for tensor in (*module.parameters(), *module.buffers())
    )
    assert loaded.resident_bytes() == {"cpu": expected}, "two workers on one device share one copy"
    assert loaded.working_bytes() == {"cpu": 0}
    assert loaded.can_offload is False
    loaded.release()
    assert loaded.resident_bytes() == {}
    assert loaded.runners == []
