"""A bug of ours after an SSE stream started still ends it with an error event the SDK raises,
through uvicorn and the official openai SDK: never a stream that just stops."""

from __future__ import annotations

import logging

import openai
import pytest
from PIL import Image

import diffuser_api.service.images as image_service
from diffuser_api.api.streaming import UNEXPECTED_FAILURE
from tests.fakes import fake_app
from tests.servers import ThreadedServer

pytestmark = pytest.mark.slow


def test_an_unexpected_error_mid_stream_reaches_the_sdk(tmp_path, monkeypatch, caplog):
    real_encode = image_service.encode_image

    def encode_previews_only(image: Image.Image, output_format: str, compression: int | None, quick: bool = False):
        if not quick:  # the final image: after the partial images went out
            raise RuntimeError("codec exploded reading /opt/secret/libcodec.so at 0x7f00deadbeef")
        return real_encode(image, output_format, compression, quick=quick)

    monkeypatch.setattr(image_service, "encode_image", encode_previews_only)
    with ThreadedServer(fake_app(tmp_path)) as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        stream = client.images.generate(prompt="a fox", size="32x32", stream=True, partial_images=2,
                                        extra_body={"num_inference_steps": 4})
        received = []
        with caplog.at_level(logging.ERROR, logger="diffuser_api.api.streaming"), pytest.raises(
            openai.APIError
        ) as caught:
            for event in stream:
                received.append(event.type)
        assert received == ["image_generation.partial_image"] * 2
        error = caught.value
        request_id = error.body["request_id"]
        assert request_id.startswith("req_")
        assert error.message == f"{UNEXPECTED_FAILURE} (request id {request_id})"
        assert error.body["type"] == "server_error" and {"param", "code"} <= set(error.body)
        assert "secret" not in str(error.body) and "0x7f" not in str(error.body)
        assert "codec exploded" in caplog.text and request_id in caplog.text
        monkeypatch.setattr(image_service, "encode_image", real_encode)
        assert client.images.generate(prompt="a fox", size="32x32").data[0].b64_json
