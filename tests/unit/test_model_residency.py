"""Several fake models in one app, through the real service and engine: lazy loads, eviction
under the count and byte budgets, the warm tier, busy models, failed loads and deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from diffuser_api.domain import Task
from diffuser_api.engine import EngineLimits
from diffuser_api.engine.engine import MAX_DEATHS_IN_A_ROW
from diffuser_api.models.served import FIRST_RETRY_S
from tests.fakes import FakeModel, FakeRunner, fake_models_app, png_bytes
from tests.servers import ThreadedServer
from tests.unit.test_api import EDIT, GEN, assert_envelope, wait_ready
from tests.unit.test_engine_faults import WorkerKiller

SECRET_PATH = "/srv/models/secret/unet/diffusion_pytorch_model.safetensors"


def generate(client: TestClient | httpx.Client, model: str, prompt: str | None = None, **body) -> httpx.Response:
    return client.post(GEN, json={"model": model, "prompt": prompt or f"for {model}", "seed": 5, **body})


def statuses(app: FastAPI) -> dict[str, str]:
    return {model.id: model.status.value for model in app.state.registry}


def served(app: FastAPI, model_id: str):
    return app.state.registry.get(model_id)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(call()), daemon=True)
    thread.start()
    return thread, answers


def test_requests_a_b_c_a_with_room_for_two(tmp_path):
    a, b, c = (FakeModel(f"model-{name}", device="gpu0") for name in "abc")
    app = fake_models_app(tmp_path, [a, b, c], max_loaded_models=2)
    with TestClient(app) as client:
        wait_ready(client)  # the default (first) model loads at start
        assert statuses(app) == {"model-a": "ready", "model-b": "unloaded", "model-c": "unloaded"}
        first = generate(client, "model-a")
        assert first.status_code == 200, first.text
        assert generate(client, "model-b").status_code == 200
        assert statuses(app) == {"model-a": "ready", "model-b": "ready", "model-c": "unloaded"}
        assert generate(client, "model-c").status_code == 200
        assert statuses(app) == {"model-a": "offloaded", "model-b": "ready", "model-c": "ready"}
        again = generate(client, "model-a")
        assert again.status_code == 200, again.text
        assert statuses(app) == {"model-a": "ready", "model-b": "offloaded", "model-c": "ready"}
        # A came back from host memory, not from disk, and served as it did before.
        assert (len(a.loaded), a.offloads, a.restores) == (1, 1, 1)
        assert served(app, "model-a").evictions == {"host": 1, "released": 0}
        assert served(app, "model-a").loads == 2
    for model in (a, b, c):  # each request reached the model it named
        assert {job.prompt for job in model.runner.jobs_seen} == {f"for {model.id}"}
    with TestClient(fake_models_app(tmp_path / "alone", [FakeModel("model-a")])) as alone:
        wait_ready(alone)
        assert again.json()["data"] == first.json()["data"] == generate(alone, "model-a").json()["data"]


def test_memory_budget_evicts_by_measured_bytes_per_device(tmp_path):
    """A first load is admitted unmeasured, then others leave if it overfilled its device; a
    model measured before makes room before it loads. Other devices are left alone."""
    a = FakeModel("model-a", device="gpu0", weight_bytes=500, working_bytes=100)
    b = FakeModel("model-b", device="gpu0", weight_bytes=500, working_bytes=100)
    c = FakeModel("model-c", device="gpu1", weight_bytes=500, working_bytes=100)
    app = fake_models_app(tmp_path, [a, b, c], memory_budget_bytes=1000, host_memory_budget_bytes=0)
    with TestClient(app) as client:
        wait_ready(client)
        assert served(app, "model-a").resident_bytes() == {"gpu0": 500}
        assert generate(client, "model-b").status_code == 200
        assert statuses(app) == {"model-a": "unloaded", "model-b": "ready", "model-c": "unloaded"}
        assert generate(client, "model-c").status_code == 200
        assert statuses(app) == {"model-a": "unloaded", "model-b": "ready", "model-c": "ready"}
        assert generate(client, "model-a").status_code == 200
        assert statuses(app) == {"model-a": "ready", "model-b": "unloaded", "model-c": "ready"}
        assert (len(a.loaded), a.releases, b.releases, c.releases) == (2, 1, 1, 0)
        assert served(app, "model-b").resident_bytes() == {}
        assert served(app, "model-b").evictions == {"host": 0, "released": 1}


def test_warm_tier_is_used_then_its_oldest_model_released_when_host_memory_runs_out(tmp_path):
    a, b, c = (FakeModel(f"model-{name}", device="gpu0", weight_bytes=600) for name in "abc")
    cpu_only = FakeModel("model-d", device="gpu0", weight_bytes=600, can_offload=False)
    app = fake_models_app(tmp_path, [a, b, c, cpu_only], max_loaded_models=1, host_memory_budget_bytes=1000)
    with TestClient(app) as client:
        wait_ready(client)
        assert generate(client, "model-b").status_code == 200
        assert statuses(app)["model-a"] == "offloaded" and a.offloads == 1
        assert generate(client, "model-c").status_code == 200  # b moves in, a (older) leaves
        assert statuses(app) == {"model-a": "unloaded", "model-b": "offloaded", "model-c": "ready",
                                 "model-d": "unloaded"}
        assert (a.releases, b.offloads) == (1, 1)
        assert generate(client, "model-b").status_code == 200  # b still holds its room until back
        assert statuses(app)["model-c"] == "unloaded" and (b.restores, c.offloads, c.releases) == (1, 0, 1)
        assert generate(client, "model-d").status_code == 200
        assert generate(client, "model-a").status_code == 200
        assert statuses(app)["model-d"] == "unloaded"  # no warm tier where it cannot offload
        assert (cpu_only.offloads, cpu_only.releases) == (0, 1)


def test_a_busy_model_is_never_evicted_and_a_request_without_room_gets_503_at_its_deadline(tmp_path):
    a = FakeModel("model-a", runner=FakeRunner("gpu0#0", gate=threading.Event()), device="gpu0")
    b = FakeModel("model-b", device="gpu0", limits=EngineLimits(request_timeout_s=0.4))
    app = fake_models_app(tmp_path, [a, b], max_loaded_models=1)
    with TestClient(app) as client:
        wait_until(lambda: statuses(app)["model-a"] == "ready", "model-a to load")
        running, answers = in_thread(lambda: generate(client, "model-a", "slow"))
        try:
            wait_until(lambda: a.runner.started("slow"), "the slow batch to start")
            refused = generate(client, "model-b")
            error = assert_envelope(refused, 503)
            assert "model-b" in error["message"] and "busy or pinned" in error["message"]
            assert float(refused.headers["retry-after"]) >= 1
            assert b.load_attempts == 0 and statuses(app)["model-a"] == "ready" and a.offloads == 0
            waiting, later = in_thread(lambda: generate(client, "model-b", "after"))
            time.sleep(0.1)
            assert b.load_attempts == 0  # still waiting for room
        finally:
            a.runner.gate.set()
        running.join(5)
        waiting.join(5)
        assert answers[0].status_code == 200 and later[0].status_code == 200, later[0].text
        assert a.runner.batch_of("slow").finished_at is not None
        assert statuses(app) == {"model-a": "offloaded", "model-b": "ready"}


def test_ten_concurrent_first_requests_share_one_load(tmp_path):
    gate = threading.Event()
    cold = FakeModel("model-b", load_gate=gate)
    app = fake_models_app(tmp_path, [FakeModel("model-a"), cold])
    with TestClient(app) as client:
        wait_ready(client)
        clients = [in_thread(lambda index=index: generate(client, "model-b", f"p{index}")) for index in range(10)]
        wait_until(lambda: cold.load_attempts == 1, "the load to start")
        time.sleep(0.2)
        assert statuses(app)["model-b"] == "loading"
        gate.set()
        for thread, _ in clients:
            thread.join(10)
        assert [answers[0].status_code for _, answers in clients] == [200] * 10
        assert cold.load_attempts == 1 and len(cold.loaded) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_broken_model_is_503_while_others_serve_and_is_tried_again_after_a_back_off(tmp_path, caplog):
    broken = FakeModel("model-b", load_error=OSError(f"no file named model.safetensors in {SECRET_PATH}"))
    clock = FakeClock()
    app = fake_models_app(tmp_path, [FakeModel("model-a"), broken], clock=clock)
    with TestClient(app) as client:
        wait_ready(client)
        for attempt in range(2):
            refused = generate(client, "model-b")
            error = assert_envelope(refused, 503)
            assert error["message"] == "model 'model-b' failed to load; the server's log says why"
            assert float(refused.headers["retry-after"]) >= 1
            assert "secret" not in refused.text and "OSError" not in refused.text
            assert broken.load_attempts == 1, f"attempt {attempt} loaded again within the back-off"
            assert generate(client, "model-a").status_code == 200
        assert client.get("/health").status_code == 200  # the default model serves
        assert statuses(app)["model-b"] == "failed"
        broken.load_error = None
        clock.now += FIRST_RETRY_S + 0.1
        assert generate(client, "model-b").status_code == 200
        assert broken.load_attempts == 2 and statuses(app)["model-b"] == "ready"
    assert SECRET_PATH in caplog.text


def test_a_load_past_the_request_deadline_is_503_with_retry_after_and_keeps_going(tmp_path):
    gate = threading.Event()
    slow = FakeModel("model-b", load_gate=gate, limits=EngineLimits(request_timeout_s=0.3))
    app = fake_models_app(tmp_path, [FakeModel("model-a"), slow])
    with TestClient(app) as client:
        wait_ready(client)
        refused = generate(client, "model-b")
        error = assert_envelope(refused, 503)
        assert error["message"] == "model 'model-b' is still loading"
        assert float(refused.headers["retry-after"]) >= 1
        gate.set()
        wait_until(lambda: statuses(app)["model-b"] == "ready", "the load to finish")
        assert generate(client, "model-b").status_code == 200
        assert slow.load_attempts == 1


def test_requests_a_model_cannot_serve_cost_no_load(tmp_path):
    cold = FakeModel("model-b", tasks=frozenset({Task.GENERATION}))
    app = fake_models_app(tmp_path, [FakeModel("model-a"), cold])
    with TestClient(app) as client:
        wait_ready(client)
        edit = client.post(EDIT, data={"model": "model-b", "prompt": "x"}, files={"image": ("a.png", png_bytes())})
        assert_envelope(edit, 501, code="not_supported")
        assert_envelope(generate(client, "model-b", size="13x7"), 400, param="size")
        assert cold.load_attempts == 0 and statuses(app)["model-b"] == "unloaded"
        assert generate(client, "model-b").status_code == 200


def test_aliases_route_to_their_model_and_openai_names_to_the_default(tmp_path):
    a = FakeModel("model-a")
    b = FakeModel("model-b", aliases=("gpt-image-1", "fast"))
    app = fake_models_app(tmp_path, [a, b])
    with TestClient(app) as client:
        wait_ready(client)
        for name, model in (("fast", b), ("gpt-image-1", b), ("dall-e-3", a), ("model-a", a)):
            response = generate(client, name, f"via {name}")
            assert response.status_code == 200, response.text
            assert model.runner.started(f"via {name}")
        error = assert_envelope(generate(client, "nope"), 404, param="model", code="model_not_found")
        assert "model-a, model-b" in error["message"]
        assert generate(client, "model-a").status_code == 200


def test_websocket_says_loading_then_serves(tmp_path):
    gate = threading.Event()
    cold = FakeModel("model-b", load_gate=gate)
    app = fake_models_app(tmp_path, [FakeModel("model-a"), cold])
    with TestClient(app) as client:
        wait_ready(client)
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_json({"model": "model-b", "prompt": "fox", "seed": 3})
            assert socket.receive_json() == {"type": "loading"}
            gate.set()
            messages = [socket.receive_json()]
            while messages[-1]["type"] not in ("done", "error"):
                messages.append(socket.receive_json())
        assert [message["type"] for message in messages][-2:] == ["completed", "done"]
        assert cold.runner.started("fox")


@pytest.mark.slow
def test_sse_stream_of_a_cold_model_starts_at_once_and_completes_after_the_load(tmp_path):
    gate = threading.Event()
    cold = FakeModel("model-b", load_gate=gate)
    with ThreadedServer(fake_models_app(tmp_path, [FakeModel("model-a"), cold], stream_ping_s=0.05)) as server:
        server.wait_ready()
        body = {"model": "model-b", "prompt": "fox", "stream": True}
        with httpx.stream("POST", f"{server.base_url}{GEN}", json=body, timeout=10) as response:
            assert response.status_code == 200  # before the load finished
            wait_until(lambda: cold.load_attempts == 1, "the stream to start the load")
            lines = response.iter_lines()
            assert next(line for line in lines if line.strip()) == ": ping"  # pings flow while it loads
            gate.set()
            rest = list(lines)
        names = [line.removeprefix("event:").strip() for line in rest if line.startswith("event:")]
        assert names == ["image_generation.completed"]


@pytest.mark.slow
def test_two_models_on_one_device_never_run_batches_at_the_same_time(tmp_path):
    a = FakeModel("model-a", runner=FakeRunner("gpu0#0", step_delay_s=0.01), device="gpu0")
    b = FakeModel("model-b", runner=FakeRunner("gpu0#0", step_delay_s=0.01), device="gpu0")
    apart = FakeModel("model-c", runner=FakeRunner("gpu1#0", gate=threading.Event()), device="gpu1")
    with ThreadedServer(fake_models_app(tmp_path, [a, b, apart])) as server:
        server.wait_ready()
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            for model in ("model-b", "model-c"):  # loaded first, so that loads do not space the batches
                if model == "model-c":
                    apart.runner.gate.set()
                assert generate(http, model, "warm").status_code == 200
            apart.runner.gate.clear()
            held, _ = in_thread(lambda: generate(http, "model-c"))
            wait_until(lambda: apart.runner.started("for model-c"), "model-c's batch on the other device")
            clients = [
                in_thread(lambda index=index: generate(http, f"model-{'ab'[index % 2]}", f"p{index}",
                                                       size=f"{16 + 8 * index}x16"))
                for index in range(8)
            ]
            for thread, answers in clients:
                thread.join(10)
                assert answers[0].status_code == 200, answers[0].text
            apart.runner.gate.set()  # a model on another device did not hold these up
            held.join(10)
    batches = sorted(a.runner.batches + b.runner.batches, key=lambda batch: batch.started_at)
    assert len(a.runner.batches) >= 4 and len(b.runner.batches) >= 4
    for earlier, later in zip(batches, batches[1:], strict=False):
        assert earlier.finished_at is not None and earlier.finished_at <= later.started_at, (earlier, later)


def test_a_loaded_model_whose_workers_keep_dying_turns_health_503_even_if_not_pinned(tmp_path):
    runner = FakeRunner("fake#0", fail_on={"kill": WorkerKiller("x")})
    app = fake_models_app(tmp_path, [FakeModel("model-a"), FakeModel("model-b", runner=runner)])
    with TestClient(app) as client:
        wait_ready(client)
        for _ in range(MAX_DEATHS_IN_A_ROW):
            assert_envelope(generate(client, "model-b", "kill"), 500)
        health = assert_envelope(client.get("/health"), 503)
        assert health["message"] == "model 'model-b' is unhealthy: its worker died 3 times in a row"
        assert statuses(app)["model-b"] == "failed"
        assert generate(client, "model-a").status_code == 200
        assert generate(client, "model-b").status_code == 200  # a replacement worker still serves
        assert client.get("/health").status_code == 200



def test_loaded_lora_adapters_count_in_the_memory_budget(tmp_path):
    """Adapters come after the load's measurement: their bytes count from when they are held.
    Without them a and b fit (800 of 1000); with a's 300 bytes of adapters b's return evicts a."""
    a = FakeModel("model-a", device="gpu0", weight_bytes=400)
    b = FakeModel("model-b", device="gpu0", weight_bytes=400)
    app = fake_models_app(tmp_path, [a, b], memory_budget_bytes=1000, host_memory_budget_bytes=0, admin_open=True)
    with TestClient(app) as client:
        wait_ready(client)
        assert generate(client, "model-b").status_code == 200
        assert statuses(app) == {"model-a": "ready", "model-b": "ready"}
        assert client.post("/v1/models/model-b/unload").status_code == 202
        wait_until(lambda: statuses(app)["model-b"] == "unloaded", "b unloaded")
        a.loaded[0].adapters = {"gpu0": 300}
        assert served(app, "model-a").resident_bytes() == {"gpu0": 700}
        assert served(app, "model-a").footprint() == {"gpu0": 700}
        assert generate(client, "model-b").status_code == 200
        assert statuses(app) == {"model-a": "unloaded", "model-b": "ready"}
