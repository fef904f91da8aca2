"""Streaming through the official openai SDK against the real server with tiny-sd."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_openai_sdk import noise_png

pytestmark = pytest.mark.slow


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_generation_stream_with_partial_images(client):
    events = list(
        client.images.generate(
            prompt="a fox", size="128x64", stream=True, partial_images=2, extra_body={"num_inference_steps": 8}
        )
    )
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = decoded(events[-1].b64_json)
    for event in events:
        assert decoded(event.b64_json).shape == (64, 128, 3)
    for partial in events[:2]:
        assert np.abs(decoded(partial.b64_json) - final).max() > 2


def test_edit_stream_and_several_images(client):
    stream = client.images.edit(
        image=noise_png(), prompt="x", n=2, stream=True, partial_images=2,
        extra_body={"num_inference_steps": 8, "strength": 1.0},
    )
    events = list(stream)
    completed = [event for event in events if event.type == "image_edit.completed"]
    partials = [event for event in events if event.type == "image_edit.partial_image"]
    assert len(completed) == 2 and len(partials) == 4
    assert sorted(event.model_extra["image_index"] for event in completed) == [0, 1]
    for event in events:
        assert decoded(event.b64_json).shape == (64, 64, 3)
