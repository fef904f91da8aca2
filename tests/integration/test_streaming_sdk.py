"""Streaming through the official openai SDK against the real server with tiny-sd."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.test_openai_sdk import noise_png, pixels

pytestmark = pytest.mark.slow


def test_generation_stream_with_partial_images(client):
    events = list(
        client.images.generate(
            prompt="a fox", size="128x64", stream=True, partial_images=2, extra_body={"num_inference_steps": 8}
        )
    )
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = pixels(events[-1].b64_json)
    for event in events:
        assert pixels(event.b64_json).shape == (64, 128, 3)
    for partial in events[:2]:
        assert np.abs(pixels(partial.b64_json) - final).max() > 2


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
        assert pixels(event.b64_json).shape == (64, 64, 3)
