"""The served stack is the fast one: uvloop and httptools (dependencies, picked by uvicorn), and
image answers written by orjson with the same JSON as the standard library's."""

from __future__ import annotations

import json

import httpx
import uvloop

from diffuser_api.api.fast_json import FastJSONResponse
from diffuser_api.cli import uvicorn_config
from tests.fakes import FakeRunner, fake_app
from tests.servers import ThreadedServer


def test_serve_runs_uvicorn_on_uvloop_and_httptools(tmp_path):
    app = fake_app(tmp_path, FakeRunner())
    config = uvicorn_config(app, app.state.settings)
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_fast_json_writes_what_the_standard_library_reads_back():
    body = {"created": 1, "data": [{"b64_json": "iVBORw0KGgo=" * 1000, "revised_prompt": "un renard ü"}],
            "usage": {"input_tokens": 3}}
    rendered = FastJSONResponse(body).body
    assert json.loads(rendered) == body
    assert b"\n" not in rendered and b": " not in rendered


def test_image_answer_written_by_orjson_reaches_a_real_client_whole(tmp_path):
    with ThreadedServer(fake_app(tmp_path, FakeRunner())) as server:
        response = httpx.post(f"{server.base_url}/v1/images/generations",
                              json={"prompt": "a fox", "size": "32x32", "n": 2}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    images = response.json()["data"]
    assert len(images) == 2 and all(image["b64_json"] for image in images)
