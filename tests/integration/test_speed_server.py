"""Speed and memory options through ``diffuser-api serve`` with the real ``openai`` client."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

MODELS = """\
models:
  - id: flux
    source: tiny-flux
    pinned: true
    speed:
      step_cache: {method: taylorseer, cache_interval: 3}
    memory: {quantization: int8}
  - id: sd
    source: tiny-sd
    memory: {vae_tiling: true}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = tmp_path_factory.mktemp("speed")
    (folder / "models.yaml").write_text(MODELS)
    live = LiveServer(folder, DIFFUSER_MODELS_FILE=str(folder / "models.yaml"))
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=0, timeout=120)


def generate(server: LiveServer, model: str, **extra) -> np.ndarray:
    result = client(server).images.generate(model=model, prompt="a red fox", size="64x64",
                                             extra_body={"seed": 5, "num_inference_steps": 8, **extra})
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))), dtype=np.int16)


def test_the_model_reports_its_speed_and_memory_options(server):
    flux = httpx.get(f"{server.base_url}/v1/models/flux").json()
    assert flux["speed"] == {
        "step_cache": {"default": "taylorseer", "cache_interval": 3,
                       "methods": ["off", "first_block_cache", "magcache", "taylorseer"]},
        "compile": False,
    }
    assert flux["memory"] == {"quantization": "int8", "cpu_offload": "none", "vae_tiling": False}
    sd = httpx.get(f"{server.base_url}/v1/models/sd").json()
    assert sd["speed"]["step_cache"] == {"default": "off", "methods": ["off"]}
    assert sd["memory"]["vae_tiling"] is True


def test_the_default_cache_is_reproducible_and_a_request_can_turn_it_off(server):
    cached = generate(server, "flux")
    assert np.array_equal(cached, generate(server, "flux"))
    uncached = generate(server, "flux", step_cache="off")
    assert not np.array_equal(cached, uncached)
    assert np.array_equal(uncached, generate(server, "flux", step_cache="off"))
    assert generate(server, "flux", step_cache="magcache").shape == (64, 64, 3)


def test_a_cache_on_a_unet_model_is_a_400_and_the_server_still_serves(server):
    response = httpx.post(f"{server.base_url}/v1/images/generations", timeout=60,
                          json={"model": "sd", "prompt": "x", "size": "64x64", "step_cache": "taylorseer"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "step_cache" and error["code"] == "unsupported_parameter"
    assert error["type"] == "invalid_request_error" and error["request_id"] == response.headers["x-request-id"]
    assert error["message"] == "step_cache 'taylorseer' is not available on model 'sd' (stable-diffusion); " \
                               "choose one of: off"
    with pytest.raises(openai.BadRequestError):
        generate(server, "sd", step_cache="first_block_cache")
    assert generate(server, "sd").shape == (64, 64, 3)


def test_a_cuda_only_option_on_cpu_stops_the_start_naming_it(tmp_path: Path):
    (tmp_path / "models.yaml").write_text("models:\n  - id: sd\n    source: tiny-sd\n    memory: {quantization: nf4}\n")
    live = LiveServer(tmp_path, DIFFUSER_MODELS_FILE=str(tmp_path / "models.yaml"), DIFFUSER_DEVICE="cpu")
    try:
        with pytest.raises(RuntimeError, match="memory.quantization 'nf4' needs a CUDA device"):
            live.wait_ready(timeout=60)
    finally:
        live.stop()
    assert live.process.returncode != 0
