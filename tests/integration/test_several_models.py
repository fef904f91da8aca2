"""Several tiny models in one real ``diffuser-api serve`` process, driven by the openai SDK.

One server (module-scoped) serves three working models with room for two, three broken
entries and a keys file; two more serve tiny-sd and the qwen edit model alone, so seeded
images can be compared byte for byte; a last one serves the shipped ``models.example.yaml``.
Tests that depend on which models are loaded set that state first (admin unload), so their
order does not matter.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import websockets
from PIL import Image
from websockets.sync.client import connect

from tests.conftest import TINY_CACHE, LiveServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"admin": "sk-several-admin", "user": "sk-several-user", "limited": "sk-several-limited"}
SIZE = "64x64"
STEPS = {"num_inference_steps": 2}
WORKING = ("tiny-sd", "qwen-edit", "qwen-edit-plus")


def models_file(folder: Path) -> Path:
    """Three working models (no pinned one: the LRU test evicts each), room for two, and
    three broken entries: a bad model_index.json, a path that does not exist, and a
    readable checkpoint whose weights are truncated (it probes, then fails to load)."""
    bad_index = folder / "bad-index"
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text("{ this is not json")
    bad_weights = folder / "bad-weights"
    shutil.copytree(TINY_CACHE / "tiny-sd", bad_weights)
    for weights in (bad_weights / "unet").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    path = folder / "models.yaml"
    path.write_text(f"""
default: tiny-sd
max_loaded_models: 2
models:
  - id: tiny-sd
    aliases: [dall-e-3]
    defaults: {{steps: 2, size: 64x64}}
  - id: qwen-edit
    source: tiny-qwen-image-edit
    aliases: [gpt-image-1]
    defaults: {{steps: 2, size: 64x64}}
  - id: qwen-edit-plus
    source: tiny-qwen-image-edit-plus
    defaults: {{steps: 2, size: 64x64}}
  - id: bad-index
    source: {bad_index}
  - id: missing
    source: {folder / "does-not-exist"}
  - id: bad-weights
    source: {bad_weights}
""")
    return path


def keys_file(folder: Path) -> Path:
    def entry(name: str, extra: str = "") -> str:
        digest = hashlib.sha256(KEYS[name].encode()).hexdigest()
        return f"  - name: {name}\n    key_sha256: {digest}\n{extra}"

    path = folder / "keys.yaml"
    path.write_text("keys:\n" + entry("admin", "    role: admin\n") + entry("user")
                    + entry("limited", "    models: [dall-e-3]\n"))
    return path


def started(*servers: LiveServer) -> None:
    """Wait for servers started together (their starts overlap)."""
    for server in servers:
        server.wait_ready()


@pytest.fixture(scope="module")
def several(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("several")
    server = LiveServer(folder, DIFFUSER_MODELS_FILE=str(models_file(folder)),
                        DIFFUSER_API_KEYS_FILE=str(keys_file(folder)))
    try:
        started(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    """The same models each served by a server of its own (``DIFFUSER_MODEL_ID``)."""
    folder = tmp_path_factory.mktemp("alone")
    servers = {"tiny-sd": LiveServer(folder, "tiny-sd"), "qwen-edit": LiveServer(folder, "tiny-qwen-image-edit")}
    try:
        started(*servers.values())
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def sdk(server: LiveServer, key: str = "user") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS.get(key, key), max_retries=0, timeout=120)


def http(server: LiveServer, method: str, path: str, key: str | None = "user", **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if key else {}
    return httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=60, **kwargs)


def noise_png(seed: int = 0) -> bytes:
    values = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def generate(client: openai.OpenAI, model: str, seed: int = 7) -> str:
    result = client.images.generate(model=model, prompt="a watercolor fox", size=SIZE,
                                    extra_body={**STEPS, "seed": seed})
    return result.data[0].b64_json


def edit(client: openai.OpenAI, model: str, images: int = 1, seed: int = 7) -> str:
    files = [(f"in{index}.png", noise_png(index), "image/png") for index in range(images)]
    result = client.images.edit(model=model, prompt="make it blue", image=files if images > 1 else files[0],
                                size=SIZE, extra_body={**STEPS, "seed": seed})
    return result.data[0].b64_json


def expect_error(call, status: int, code: str | None = None) -> openai.APIStatusError:
    """The call fails with ``status`` and a whole OpenAI error envelope."""
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value
    assert error.status_code == status, error.body
    assert {"message", "type", "param", "code", "request_id"} <= set(error.body)
    assert error.body["request_id"]
    if code is not None:
        assert error.code == code, error.body
    return error


def statuses(client: openai.OpenAI) -> dict[str, str]:
    return {model.id: model.status for model in client.models.list()}


def details(server: LiveServer, model_id: str) -> dict:
    response = http(server, "GET", f"/v1/models/{model_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_status(server: LiveServer, model_id: str, wanted: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := details(server, model_id)["status"]) != wanted:
        assert time.monotonic() < deadline, f"{model_id} stayed {status}, never {wanted}"
        time.sleep(0.1)


def unload(server: LiveServer, *model_ids: str) -> None:
    """Admin-unload and wait until each model has left (a known starting state)."""
    for model_id in model_ids:
        response = http(server, "POST", f"/v1/models/{model_id}/unload", key="admin")
        assert response.status_code in (200, 202), response.text
        wait_status(server, model_id, "unloaded")


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """One sample of the Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in http(server, "GET", "/metrics").text.splitlines():
        if line.startswith(f"{name}{{"):
            sample, value = line.rsplit(" ", 1)
            found = ",".join(sorted(sample[len(name) + 1:-1].split(",")))
            if found == wanted:
                return float(value)
    return 0.0


# -- routing ------------------------------------------------------------------------------------


def test_each_request_reaches_the_model_it_named(several, alone):
    """Seeded images equal those of the same model served alone, so no other model made them."""
    client = sdk(several)
    sd_alone, qwen_alone = sdk(alone["tiny-sd"]), sdk(alone["qwen-edit"])
    assert base64.b64decode(generate(client, "tiny-sd")) == base64.b64decode(generate(sd_alone, "tiny-sd"))
    assert base64.b64decode(edit(client, "qwen-edit")) == base64.b64decode(edit(qwen_alone, "tiny-qwen-image-edit"))
    # The multi-image model takes two images; the others' answers differ from its own.
    plus = pixels(edit(client, "qwen-edit-plus", images=2))
    assert plus.shape == (64, 64, 3)
    assert not np.array_equal(pixels(edit(client, "qwen-edit-plus")), pixels(edit(client, "qwen-edit")))


def test_aliases_route_to_the_model_that_claims_them(several):
    client = sdk(several)
    assert generate(client, "dall-e-3") == generate(client, "tiny-sd")
    assert edit(client, "gpt-image-1") == edit(client, "qwen-edit")
    # gpt-image-1 is claimed by the edit model: no generation there, not the default's.
    error = expect_error(lambda: generate(client, "gpt-image-1"), 501, "not_supported")
    assert "qwen-edit" in error.message
    # An OpenAI name nobody claims reaches the default model.
    assert generate(client, "dall-e-2") == generate(client, "tiny-sd")


def test_a_task_the_named_model_lacks_is_501_without_loading_it(several):
    client = sdk(several)
    unload(several, "qwen-edit")
    loads = details(several, "qwen-edit")["loads"]
    error = expect_error(lambda: generate(client, "qwen-edit"), 501, "not_supported")
    assert "qwen-edit" in error.message and "generation" in error.message
    # Known from the checkpoint: answered without a load.
    assert (details(several, "qwen-edit")["status"], details(several, "qwen-edit")["loads"]) == ("unloaded", loads)
    # The other way round: an edit of several images on tiny-sd, which edits one.
    error = expect_error(lambda: edit(client, "tiny-sd", images=2), 501, "not_supported")
    assert "tiny-sd" in error.message and "several images" in error.message
    assert generate(client, "tiny-sd")


def test_an_unknown_model_is_404_listing_the_served_ones(several):
    client = sdk(several)
    error = expect_error(lambda: generate(client, "no-such-model"), 404, "model_not_found")
    assert error.param == "model"
    assert all(model_id in error.message for model_id in WORKING)
    assert generate(client, "tiny-sd")


# -- loading and eviction ---------------------------------------------------------------------------


def test_least_recently_used_model_leaves_for_a_third(several):
    """Room for two; requests A, B, C, A: C evicts A, then A evicts B. On CPU an evicted model
    is released (unloaded), never offloaded. A is served as before after its eviction."""
    client = sdk(several)
    unload(several, *WORKING)
    a, b, c = WORKING
    evictions = details(several, a)["evictions"]["released"]
    first = generate(client, a)
    assert {model: statuses(client)[model] for model in WORKING} == {a: "ready", b: "unloaded", c: "unloaded"}
    edit(client, b)
    assert {model: statuses(client)[model] for model in WORKING} == {a: "ready", b: "ready", c: "unloaded"}
    edit(client, c, images=2)
    assert {model: statuses(client)[model] for model in WORKING} == {a: "unloaded", b: "ready", c: "ready"}
    assert details(several, a)["evictions"] == {"host": 0, "released": evictions + 1}
    assert details(several, a)["resident_bytes"] == {}
    again = generate(client, a)
    assert {model: statuses(client)[model] for model in WORKING} == {a: "ready", b: "unloaded", c: "ready"}
    assert base64.b64decode(again) == base64.b64decode(first)
    assert details(several, a)["resident_bytes"]["cpu"] > 0
    assert metric(several, "diffuser_model_evictions_total", model=b, kind="released") >= 1


def test_ten_concurrent_first_requests_share_one_load(several):
    unload(several, "qwen-edit-plus")
    loads = details(several, "qwen-edit-plus")["loads"]
    counted = metric(several, "diffuser_model_loads_total", model="qwen-edit-plus")

    async def ten() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{several.base_url}/v1", api_key=KEYS["user"], max_retries=0,
                                    timeout=120)
        files = [("a.png", noise_png(0), "image/png"), ("b.png", noise_png(1), "image/png")]
        results = await asyncio.gather(*(
            client.images.edit(model="qwen-edit-plus", prompt="blue", image=files, size=SIZE,
                               extra_body={**STEPS, "seed": seed})
            for seed in range(10)
        ))
        await client.close()
        return [result.data[0].b64_json for result in results]

    images = asyncio.run(ten())
    assert len(set(images)) == 10  # ten seeds, ten images
    assert details(several, "qwen-edit-plus")["loads"] == loads + 1
    assert metric(several, "diffuser_model_loads_total", model="qwen-edit-plus") == counted + 1


def test_two_cold_models_asked_for_at_once_both_load(several):
    """Two loads on two threads at the same moment (they once broke each other's weights)."""
    unload(several, "qwen-edit", "qwen-edit-plus")

    async def both() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{several.base_url}/v1", api_key=KEYS["user"], max_retries=0,
                                    timeout=120)
        image = ("a.png", noise_png(0), "image/png")
        results = await asyncio.gather(*(
            client.images.edit(model=model, prompt="make it blue", image=image, size=SIZE,
                               extra_body={**STEPS, "seed": 7})
            for model in ("qwen-edit", "qwen-edit-plus")
        ))
        await client.close()
        return [result.data[0].b64_json for result in results]

    edited, edited_plus = asyncio.run(both())
    assert edited == edit(sdk(several), "qwen-edit")
    assert {model: statuses(sdk(several))[model] for model in ("qwen-edit", "qwen-edit-plus")} == {
        "qwen-edit": "ready", "qwen-edit-plus": "ready"}


def test_broken_entries_are_503_naming_the_model_while_the_others_serve(several):
    client = sdk(several)
    for model_id in ("bad-index", "missing", "bad-weights"):
        error = expect_error(lambda model_id=model_id: generate(client, model_id), 503)
        # Our words only: no path, no exception text (the log has them).
        assert error.body["message"] == f"model '{model_id}' failed to load; the server's log says why"
        if model_id == "bad-weights":
            # At once, within the back-off, a retry is the same 503 telling when to come back.
            again = http(several, "POST", "/v1/images/generations", json={"model": model_id, "prompt": "x"})
            assert again.status_code == 503 and again.json()["error"]["message"] == error.body["message"]
            assert float(again.headers["retry-after"]) >= 1
        assert statuses(client)[model_id] == "failed"
        assert generate(client, "tiny-sd")
    # The truncated weights were probed: described (and checked) without a load.
    assert details(several, "bad-weights")["endpoints"]["generations"]["supported"] is True
    expect_error(lambda: edit(client, "bad-weights", images=2), 501, "not_supported")
    health = http(several, "GET", "/health", params={"model": "bad-index"})
    assert health.status_code == 503 and "bad-index" in health.json()["error"]["message"]
    assert edit(client, "qwen-edit")


def test_a_stream_to_a_cold_model_waits_for_its_load(several):
    """SSE: the 200 comes first, the load happens inside the stream; the image is the one a
    plain request gets."""
    client = sdk(several)
    unload(several, "qwen-edit")
    events = list(client.images.edit(model="qwen-edit", prompt="make it blue", image=("in0.png", noise_png(0),
                                                                                       "image/png"),
                                     size=SIZE, stream=True, extra_body={**STEPS, "seed": 7}))
    assert [event.type for event in events] == ["image_edit.completed"]
    assert base64.b64decode(events[0].b64_json) == base64.b64decode(edit(client, "qwen-edit"))


def test_a_websocket_to_a_cold_model_hears_loading_first(several):
    unload(several, "tiny-sd")
    url = several.base_url.replace("http://", "ws://") + "/v1/images/ws"
    received = []
    with connect(url, additional_headers={"Authorization": f"Bearer {KEYS['user']}"}) as socket:
        socket.send(json.dumps({"model": "tiny-sd", "prompt": "a watercolor fox", "size": SIZE, **STEPS,
                                "seed": 7}))
        try:
            while True:
                received.append(json.loads(socket.recv(timeout=60)))
        except websockets.exceptions.ConnectionClosed:
            pass
    kinds = [message["type"] for message in received]
    assert kinds[0] == "loading" and kinds.count("loading") == 1
    assert kinds[-2:] == ["completed", "done"], kinds
    assert base64.b64decode(received[-2]["b64_json"]) == base64.b64decode(generate(sdk(several), "tiny-sd"))


# -- admin, keys and health ---------------------------------------------------------------------------


def test_admin_loads_and_unloads(several):
    unload(several, "qwen-edit")
    response = http(several, "POST", "/v1/models/qwen-edit/load", key="admin")
    assert response.status_code == 202 and response.json()["status"] == "loading"
    wait_status(several, "qwen-edit", "ready")
    again = http(several, "POST", "/v1/models/qwen-edit/load", key="admin")
    assert again.status_code == 200 and again.json()["status"] == "ready"
    response = http(several, "POST", "/v1/models/qwen-edit/unload", key="admin")
    assert response.status_code == 202
    wait_status(several, "qwen-edit", "unloaded")
    assert http(several, "POST", "/v1/models/qwen-edit/unload", key="admin").status_code == 200
    assert edit(sdk(several), "qwen-edit")  # a request loads it again


@pytest.mark.parametrize("key, status", [("user", 403), ("limited", 403), (None, 401)])
def test_admin_routes_refuse_other_callers(several, key, status):
    for action in ("load", "unload"):
        response = http(several, "POST", f"/v1/models/qwen-edit/{action}", key=key)
        assert response.status_code == status, response.text
        envelope = response.json()["error"]
        assert {"message", "type", "param", "code", "request_id"} <= set(envelope)
        if status == 403:
            assert envelope["code"] == "admin_required"
    assert generate(sdk(several), "tiny-sd")


def test_a_key_limited_to_some_models_sees_no_others(several):
    limited = sdk(several, "limited")
    assert generate(limited, "dall-e-3") == generate(limited, "tiny-sd")
    error = expect_error(lambda: edit(limited, "qwen-edit"), 404, "model_not_found")
    assert "qwen-edit" not in error.message.split("Served models:")[1]
    assert [model.id for model in limited.models.list()] == ["tiny-sd"]
    expect_error(lambda: limited.models.retrieve("qwen-edit"), 404, "model_not_found")
    assert http(several, "GET", "/health", key="limited", params={"model": "qwen-edit"}).status_code == 404
    assert [model["id"] for model in http(several, "GET", "/", key="limited").json()["models"]] == ["tiny-sd"]
    assert edit(sdk(several), "qwen-edit")  # the same model serves every other key


def test_health_per_model(several):
    client = sdk(several)
    generate(client, "tiny-sd")
    assert http(several, "GET", "/health", key=None).status_code == 200
    assert http(several, "GET", "/health", params={"model": "tiny-sd"}).json() == {"status": "ok"}
    unload(several, "qwen-edit")
    not_ready = http(several, "GET", "/health", params={"model": "qwen-edit"})
    assert not_ready.status_code == 503 and "qwen-edit" in not_ready.json()["error"]["message"]
    unknown = http(several, "GET", "/health", params={"model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    edit(client, "qwen-edit")
    assert http(several, "GET", "/health", params={"model": "qwen-edit"}).status_code == 200


# -- the shipped example ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("example"), DIFFUSER_MODELS_FILE=str(ROOT / "models.example.yaml"))
    try:
        started(server)
        yield server
    finally:
        server.stop()


def test_models_example_yaml_serves_each_of_its_models(example):
    client = openai.OpenAI(base_url=f"{example.base_url}/v1", api_key="none", max_retries=0, timeout=120)
    assert statuses(client) == {"tiny-sd": "ready", "tiny-qwen-edit": "unloaded", "tiny-qwen-edit-plus": "unloaded"}
    generated = client.images.generate(model="dall-e-3", prompt="a fox")  # the example's defaults: 64x64
    assert pixels(generated.data[0].b64_json).shape == (64, 64, 3)
    image = ("in.png", noise_png(), "image/png")
    edited = client.images.edit(model="tiny-qwen-edit", prompt="blue", image=image)
    assert pixels(edited.data[0].b64_json).shape == (64, 64, 3)
    both = client.images.edit(model="tiny-qwen-edit-plus", prompt="blend", image=[image, ("b.png", noise_png(1),
                                                                                          "image/png")])
    assert pixels(both.data[0].b64_json).shape == (64, 64, 3)
    # Room for two, tiny-sd pinned: the edit models took turns, tiny-sd stayed.
    assert statuses(client) == {"tiny-sd": "ready", "tiny-qwen-edit": "unloaded", "tiny-qwen-edit-plus": "ready"}
    described = httpx.get(f"{example.base_url}/v1/models/tiny-sd").json()
    assert described["pinned"] is True and described["loads"] == 1
    assert json.loads(httpx.get(f"{example.base_url}/health").text) == {"status": "ok"}
