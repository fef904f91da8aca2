"""The per-device adapter switch with a recording stand-in for a diffusers pipeline: one active
set at a time under many threads, no starvation of a waiting set, the LRU, and a failed load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffuser_api.errors import Unavailable
from diffuser_api.models.adapters import DeviceAdapters
from diffuser_api.models.spec import AdapterSpec

SPECS = tuple(AdapterSpec(name, f"/loras/{name}.safetensors") for name in ("a", "b", "c", "bad"))


class RecordingPipeline:
    """Records what the switch does; its ``active`` is what a pipeline call would see."""

    def __init__(self) -> None:
        self.components: dict[str, object] = {}
        self.loaded: list[str] = []
        self.active: tuple[tuple[str, float], ...] = ()
        self.calls: list[str] = []

    def load_lora_weights(self, source: str, weight_name: str | None, adapter_name: str) -> None:
        self.calls.append(f"load {adapter_name}")
        if adapter_name == "bad":
            raise OSError(f"{source}: not a safetensors file")
        self.loaded.append(adapter_name)

    def delete_adapters(self, name: str) -> None:
        self.calls.append(f"delete {name}")
        self.loaded.remove(name)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"unet": list(self.loaded)}

    def set_adapters(self, names: list[str], adapter_weights: list[float]) -> None:
        assert set(names) <= set(self.loaded)
        self.active = tuple(zip(names, adapter_weights, strict=True))

    def enable_lora(self) -> None:
        pass

    def disable_lora(self) -> None:
        self.active = ()


def test_calls_never_see_another_set_and_same_set_calls_run_side_by_side():
    pipeline = RecordingPipeline()
    adapters = DeviceAdapters(pipeline, SPECS, max_loaded=8, model_id="m")
    sets = [(("a", 1.0),), (), (("a", 0.5), ("b", 1.0)), (("b", 2.0),)]
    running: dict[tuple, int] = {}
    lock = threading.Lock()
    overlaps = []

    def call(index: int) -> None:
        wanted = sets[index // 6 % len(sets)]  # runs of one set, as batching by set makes them
        with adapters.applied(wanted):
            assert pipeline.active == wanted
            with lock:
                running[wanted] = running.get(wanted, 0) + 1
                assert [s for s, count in running.items() if count] == [wanted], "two sets at once"
                overlaps.append(running[wanted])
            time.sleep(0.002)
            assert pipeline.active == wanted
            with lock:
                running[wanted] -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(200)))
    assert max(overlaps) > 1, "calls with the same set should share the device"
    assert sorted(pipeline.loaded) == ["a", "b"]


def test_a_waiting_set_is_not_overtaken_by_new_calls_with_the_active_set():
    pipeline = RecordingPipeline()
    adapters = DeviceAdapters(pipeline, SPECS, max_loaded=8, model_id="m")
    release = threading.Event()
    order: list[str] = []

    def hold_a() -> None:
        with adapters.applied((("a", 1.0),)):
            release.wait(5)
            order.append("first a")

    def wants(wanted: tuple, label: str) -> None:
        with adapters.applied(wanted):
            order.append(label)

    first = threading.Thread(target=hold_a)
    first.start()
    time.sleep(0.05)
    b = threading.Thread(target=wants, args=((("b", 1.0),), "b"))
    b.start()
    time.sleep(0.05)
    late_a = threading.Thread(target=wants, args=((("a", 1.0),), "late a"))
    late_a.start()
    time.sleep(0.05)
    release.set()
    for thread in (first, b, late_a):
        thread.join(5)
    assert order == ["first a", "b", "late a"]


def test_the_lru_drops_the_least_recently_used_adapter_not_in_use():
    pipeline = RecordingPipeline()
    adapters = DeviceAdapters(pipeline, SPECS, max_loaded=2, model_id="m")
    for wanted in ((("a", 1.0),), (("b", 1.0),), (("a", 1.0),), (("c", 1.0),)):
        with adapters.applied(wanted):
            pass
    assert adapters.loaded_names == ("a", "c")
    assert pipeline.calls == ["load a", "load b", "delete b", "load c"]
    with adapters.applied((("b", 1.0), ("c", 1.0))):  # a set of two keeps both, dropping a
        assert pipeline.active == (("b", 1.0), ("c", 1.0))
    assert adapters.loaded_names == ("c", "b")


def test_an_adapter_that_fails_to_load_is_unavailable_naming_it_and_the_device_keeps_serving():
    pipeline = RecordingPipeline()
    adapters = DeviceAdapters(pipeline, SPECS, max_loaded=8, model_id="m")
    with pytest.raises(Unavailable) as failed:
        with adapters.applied((("bad", 1.0),)):
            pytest.fail("a call ran without its adapter")
    assert "'bad'" in failed.value.message and "/loras" not in failed.value.message
    with adapters.applied((("a", 1.0),)):
        assert pipeline.active == (("a", 1.0),)
    with adapters.applied(()):
        assert pipeline.active == ()
    assert adapters.loaded_names == ("a",)
