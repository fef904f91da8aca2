"""LoRA adapters and presets in a real ``diffuser-api serve`` process, driven by the openai SDK,
httpx and a WebSocket client.

tiny-sd runs two workers on one device (``device: [cpu, cpu]``): they share the weights, so
concurrent requests with different adapter sets exercise the per-device switch. The adapters
are random LoRAs peft wrote in diffusers' format; one more is a broken file.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import websockets
from PIL import Image
from websockets.sync.client import connect

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

SIZE = "64x64"
INK = [{"name": "ink"}]
NEON = [{"name": "neon", "scale": 1.5}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_lora) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("loras")
    broken = folder / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    sepia = tiny_lora("tiny-sd", 3)
    (folder / "models.yaml").write_text(f"""
models:
  - id: tiny-sd
    device: [cpu, cpu]
    defaults: {{steps: 2, size: 64x64}}
    engine: {{batch_wait_ms: 20}}
    max_loaded_adapters: 2
    adapters:
      ink: {{source: {tiny_lora("tiny-sd", 1)}}}
      neon: {{source: {tiny_lora("tiny-sd", 2)}, scale: 0.5}}
      sepia: {{source: {sepia.parent}, weight_name: {sepia.name}}}
      broken: {{source: ./broken.safetensors}}
presets:
  - id: tiny-sd-ink
    model: tiny-sd
    loras: [{{name: ink, scale: 0.7}}]
    defaults: {{steps: 3}}
""")
    live = LiveServer(folder, DIFFUSER_MODELS_FILE=str(folder / "models.yaml"))
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def generate(client: openai.OpenAI, loras: list | None = None, model: str = "tiny-sd", seed: int = 7,
             prompt: str = "a fox", **extra) -> bytes:
    body = {"seed": seed, **extra} | ({"loras": loras} if loras is not None else {})
    result = client.images.generate(model=model, prompt=prompt, size=SIZE, extra_body=body)
    return base64.b64decode(result.data[0].b64_json)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def expect_error(call, status: int) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value
    assert error.status_code == status, error.body
    assert {"message", "type", "param", "code", "request_id"} <= set(error.body)
    assert error.body["request_id"]
    return error


def adapters(server: LiveServer) -> dict[str, bool]:
    details = httpx.get(f"{server.base_url}/v1/models/tiny-sd").json()
    return {adapter["name"]: adapter["loaded"] for adapter in details["adapters"]}


def test_an_adapter_changes_the_pixels_and_scale_zero_gives_the_base_image(client):
    base = generate(client)
    ink = generate(client, INK)
    assert np.abs(pixels(ink) - pixels(base)).mean() > 1
    assert generate(client, [{"name": "ink", "scale": 0}]) == base
    assert generate(client, []) == base
    assert generate(client, INK) == ink


def test_concurrent_requests_with_different_adapters_each_equal_their_solo_run(client):
    """Ink and neon alternate with requests without adapters on two workers sharing weights."""
    asks = [(INK, "a fox"), (None, "a hat"), (NEON, "a fox"), (INK, "a cat"), (None, "a fox"), (NEON, "a hat")]
    solo = [generate(client, loras, prompt=prompt) for loras, prompt in asks]
    for index, first in enumerate(solo):  # every set and prompt gives a clearly different image
        assert all(np.abs(pixels(first) - pixels(other)).mean() > 1 for other in solo[index + 1:])
    with ThreadPoolExecutor(len(asks) * 2) as pool:
        together = list(pool.map(lambda ask: generate(client, ask[0], prompt=ask[1]), asks * 2))
    for ask, alone, concurrent in zip(asks * 2, solo * 2, together, strict=True):
        # Equal up to the rounding of a batched call (a request batched with another of its set
        # differs by at most 1 per channel); another adapter state would differ by far more.
        assert np.abs(pixels(concurrent) - pixels(alone)).max() <= 2, ask


def test_a_preset_through_the_openai_sdk(client):
    cards = {card.id: card for card in client.models.list().data}
    assert cards["tiny-sd-ink"].parent == "tiny-sd"  # the SDK keeps extra fields
    assert client.models.retrieve("tiny-sd-ink").loras == [{"name": "ink", "scale": 0.7}]
    preset = generate(client, model="tiny-sd-ink")
    assert preset == generate(client, [{"name": "ink", "scale": 0.7}], num_inference_steps=3)
    # The request overrides the preset: its own loras, its own steps.
    assert generate(client, [], model="tiny-sd-ink", num_inference_steps=2) == generate(client)


def test_an_unknown_adapter_and_a_path_are_400s_and_the_server_still_serves(client, tiny_lora):
    unknown = expect_error(lambda: generate(client, [{"name": "watercolor"}]), 400)
    assert unknown.body["param"] == "loras"
    assert "broken, ink, neon, sepia" in unknown.body["message"]
    file = str(tiny_lora("tiny-sd", 1))
    path = expect_error(lambda: generate(client, [{"name": file}]), 400)
    assert "never paths or URLs" in path.body["message"] and file not in path.body["message"]
    assert generate(client)


def test_an_adapter_that_fails_to_load_is_a_503_naming_it_and_the_model_keeps_serving(client, server):
    broken = expect_error(lambda: generate(client, [{"name": "broken"}]), 503)
    assert "'broken'" in broken.body["message"] and "safetensors" not in broken.body["message"]
    assert generate(client, INK) and generate(client)
    assert "loading LoRA adapter broken of tiny-sd failed" in server.log.read_text()


def test_the_lru_unloads_the_least_recently_used_adapter(client, server):
    ink = generate(client, INK)
    generate(client, NEON)
    generate(client, [{"name": "sepia"}])
    assert adapters(server) == {"ink": False, "neon": True, "sepia": True, "broken": False}
    assert generate(client, INK) == ink  # loaded again: the same pixels
    assert adapters(server) == {"ink": True, "neon": False, "sepia": True, "broken": False}


def test_streams_and_the_websocket_take_loras(client, server):
    expected = generate(client, NEON)
    events = list(client.images.generate(model="tiny-sd", prompt="a fox", size=SIZE, stream=True,
                                         extra_body={"seed": 7, "loras": NEON}))
    assert base64.b64decode(events[-1].b64_json) == expected
    received = []
    with connect(server.base_url.replace("http://", "ws://") + "/v1/images/ws") as socket:
        socket.send(json.dumps({"model": "tiny-sd", "prompt": "a fox", "size": SIZE, "seed": 7, "loras": NEON}))
        try:
            while True:
                received.append(json.loads(socket.recv(timeout=60)))
        except websockets.exceptions.ConnectionClosed:
            pass
    assert received[-1]["type"] == "done"
    assert base64.b64decode(received[-2]["b64_json"]) == expected


def test_models_file_sources_are_never_shown(server):
    text = httpx.get(f"{server.base_url}/v1/models/tiny-sd").text
    assert str(Path.home()) not in text and "safetensors" not in text
