"""Loading real (tiny) checkpoints: tasks derived from diffusers, one copy of the weights."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from diffuser_api.config import Settings
from diffuser_api.domain import Task
from diffuser_api.models.checkpoint import probe_model
from diffuser_api.models.cpu_threads import CpuThreads
from diffuser_api.models.loading import load_model
from diffuser_api.models.spec import ModelSpec
from tests.conftest import TINY_CACHE
from tests.fakes import image_job

pytestmark = pytest.mark.slow

SETTINGS = Settings(_env_file=None, cache_dir=TINY_CACHE)


def spec(source: str = "tiny-sd", devices: tuple[str, ...] = ("cpu",)) -> ModelSpec:
    return ModelSpec(id="model", source=source, devices=devices)


def test_tasks_share_one_copy_of_the_weights():
    loaded = load_model(spec(), SETTINGS)
    pipelines = loaded.runners[0].pipelines
    assert set(pipelines) == {Task.GENERATION, Task.EDIT, Task.MASKED_EDIT, Task.VARIATION}
    base = pipelines[Task.GENERATION]
    for task in (Task.EDIT, Task.MASKED_EDIT):
        for module in ("unet", "vae", "text_encoder"):
            assert getattr(pipelines[task], module) is getattr(base, module)
    assert {type(p).__name__ for p in pipelines.values()} == {
        "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"
    }


def test_two_workers_on_one_device_share_weights_but_not_schedulers():
    first, second = load_model(spec(devices=("cpu", "cpu")), SETTINGS).runners
    a, b = first.pipelines[Task.GENERATION], second.pipelines[Task.GENERATION]
    assert a.unet is b.unet
    assert a.scheduler is not b.scheduler
    assert first.pipelines[Task.EDIT].scheduler is a.scheduler


def test_local_folder_loads_like_a_hub_id(tmp_path: Path):
    folder = TINY_CACHE / "tiny-sd"
    load_model(spec(), SETTINGS)  # makes sure the folder exists
    loaded = load_model(spec(str(folder)), SETTINGS)
    assert loaded.pipeline_class == "StableDiffusionPipeline"
    assert probe_model(spec(str(folder)), SETTINGS).capabilities.notes == ()  # not announced as a tiny model


def test_loads_on_several_threads_at_once_all_succeed():
    """The registry loads two cold models on two threads at the same time; unguarded,
    diffusers' process-wide meta-device patch left one of them without weights."""
    loaded, errors = [], []

    def load() -> None:
        try:
            loaded.append(load_model(spec(), SETTINGS))
        except Exception as error:  # recorded, so the assertion shows what went wrong
            errors.append(repr(error))

    for _ in range(3):
        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(loaded) == 9
    assert all(model.resident_bytes()["cpu"] == loaded[0].resident_bytes()["cpu"] > 0 for model in loaded)


def test_two_workers_on_one_cpu_share_its_cores():
    """A call that starts alone takes every core; one that starts while the other runs takes
    its share, so the two teams never run more threads than the cores."""
    cores = CpuThreads(2)
    first, second = load_model(spec(devices=("cpu", "cpu")), SETTINGS, cores).runners
    threads: dict[str, int] = {}
    second_done = threading.Event()

    def run(runner, name: str, on_first_step) -> None:
        def on_step(step: int, total: int, previews) -> None:
            if step == 1:
                threads[name] = torch.get_num_threads()
                on_first_step()

        runner.run([image_job("a fox", steps=2)], on_step)

    def start_second() -> None:
        worker = threading.Thread(target=run, args=(second, "second", second_done.set))
        worker.start()
        assert second_done.wait(60)  # the first call is still running: both are busy
        worker.join()

    first_worker = threading.Thread(target=run, args=(first, "first", start_second))
    first_worker.start()
    first_worker.join()
    assert threads == {"first": 2, "second": 1}
