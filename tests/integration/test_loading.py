"""Loading real (tiny) checkpoints: tasks derived from diffusers, one copy of the weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffuser_api.domain import Task
from diffuser_api.models.loading import LoadOptions, load_model
from tests.conftest import TINY_CACHE

pytestmark = pytest.mark.slow


def options(**overrides) -> LoadOptions:
    values = dict(model_id="tiny-sd", cache_dir=TINY_CACHE, devices=("cpu",), torch_dtype="auto",
                  min_image_size=64, max_image_size=2048, variation_strength=0.7)
    return LoadOptions(**(values | overrides))


def test_tasks_share_one_copy_of_the_weights():
    loaded = load_model(options())
    pipelines = loaded.runners[0].pipelines
    assert loaded.capabilities.tasks == {Task.GENERATION, Task.EDIT, Task.MASKED_EDIT, Task.VARIATION}
    base = pipelines[Task.GENERATION]
    for task in (Task.EDIT, Task.MASKED_EDIT):
        for module in ("unet", "vae", "text_encoder"):
            assert getattr(pipelines[task], module) is getattr(base, module)
    assert {type(p).__name__ for p in pipelines.values()} == {
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"
    }


def test_two_workers_on_one_device_share_weights_but_not_schedulers():
    first, second = load_model(options(devices=("cpu", "cpu"))).runners
    a, b = first.pipelines[Task.GENERATION], second.pipelines[Task.GENERATION]
    assert a.unet is b.unet
    assert a.scheduler is not b.scheduler
    assert first.pipelines[Task.EDIT].scheduler is a.scheduler


def test_local_folder_loads_like_a_hub_id(tmp_path: Path):
    folder = TINY_CACHE / "tiny-sd"
    load_model(options())  # makes sure the folder exists
    loaded = load_model(options(model_id=str(folder)))
    assert loaded.pipeline_class == "StableDiffusionPipeline"
    assert loaded.capabilities.notes == ()  # a local folder is not announced as a tiny model
