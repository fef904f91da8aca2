"""Per-request cost caps: n, steps (also those a quality preset implies) and pixel-steps.

The bounds are settings alone: no schema constant refuses what a setting allows, nor allows
what it refuses.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from diffuser_api.config import Settings
from diffuser_api.errors import InvalidRequest
from diffuser_api.service.validation import check_cost
from tests.fakes import FakeRunner, fake_app
from tests.unit.test_api import GEN, assert_envelope, assert_still_serves, wait_ready


def serve(tmp_path, runner: FakeRunner | None = None, **settings) -> TestClient:
    return TestClient(fake_app(tmp_path, runner, **settings))


@pytest.mark.parametrize(
    ("payload", "param", "words"),
    [
        ({"n": 11}, "n", "at most 10"),
        ({"num_inference_steps": 101}, "num_inference_steps", "at most 100"),
        ({"num_inference_steps": 501}, "num_inference_steps", "at most 100"),
    ],
)
def test_over_the_default_caps_is_a_400_naming_the_param_and_the_limit(tmp_path, payload, param, words):
    runner = FakeRunner()
    with serve(tmp_path, runner) as client:
        wait_ready(client)
        error = assert_envelope(client.post(GEN, json={"prompt": "x", **payload}), 400, param, "invalid_value")
        assert words in error["message"]
        assert error["type"] == "invalid_request_error"
        assert_still_serves(client)
    assert [job.prompt for job in runner.jobs_seen] == ["still alive"]


def test_settings_alone_set_the_bounds_of_n_and_steps(tmp_path):
    """Past the old schema constants (n 10, steps 500) when the settings allow it; refused
    below them when the settings say so."""
    runner = FakeRunner()
    with serve(tmp_path, runner, max_n=12, max_steps=600) as client:
        wait_ready(client)
        response = client.post(GEN, json={"prompt": "many", "n": 12, "num_inference_steps": 550, "size": "16x16"})
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 12
    assert {job.steps for job in runner.jobs_seen} == {550}
    with serve(tmp_path, max_n=2, max_steps=5) as client:
        wait_ready(client)
        assert "at most 2" in assert_envelope(client.post(GEN, json={"prompt": "x", "n": 3}), 400, "n")["message"]
        error = assert_envelope(client.post(GEN, json={"prompt": "x", "num_inference_steps": 6}), 400)
        assert error["param"] == "num_inference_steps" and "at most 5" in error["message"]
        assert client.post(GEN, json={"prompt": "x", "n": 2, "num_inference_steps": 5}).status_code == 200


def test_zero_n_and_zero_steps_stay_refused(tmp_path):
    with serve(tmp_path) as client:
        wait_ready(client)
        assert_envelope(client.post(GEN, json={"prompt": "x", "n": 0}), 400, "n")
        assert_envelope(client.post(GEN, json={"prompt": "x", "num_inference_steps": 0}), 400, "num_inference_steps")
        assert_still_serves(client)


def test_steps_a_quality_preset_implies_count_against_max_steps(tmp_path):
    runner = FakeRunner()
    # The fake family's default is 4 steps; with 80 by setting, high (x1.5) means 120.
    with serve(tmp_path, runner, default_steps=80) as client:
        wait_ready(client)
        error = assert_envelope(client.post(GEN, json={"prompt": "x", "quality": "high"}), 400, "quality")
        assert "120 steps" in error["message"] and "limit of 100" in error["message"]
        assert client.post(GEN, json={"prompt": "medium", "quality": "medium", "size": "16x16"}).status_code == 200
        # An explicit number wins over the preset, and is held to the same cap.
        explicit = {"prompt": "explicit", "quality": "high", "num_inference_steps": 90, "size": "16x16"}
        ok = client.post(GEN, json=explicit)
        assert ok.status_code == 200, ok.text
    assert [job.steps for job in runner.jobs_seen] == [80, 90]


def test_pixel_steps_over_the_cap_names_n_and_says_how_many_fit(tmp_path):
    runner = FakeRunner()
    cap = 3 * 64 * 64 * 10  # three 64x64 images at 10 steps
    with serve(tmp_path, runner, max_pixel_steps=cap) as client:
        wait_ready(client)
        payload = {"prompt": "x", "n": 4, "size": "64x64", "num_inference_steps": 10}
        error = assert_envelope(client.post(GEN, json=payload), 400, "n", "invalid_value")
        assert f"limit of {cap}" in error["message"] and "n can be at most 3" in error["message"]
        response = client.post(GEN, json={**payload, "prompt": "fits", "n": 3})
        assert response.status_code == 200, response.text
    assert [job.prompt for job in runner.jobs_seen] == ["fits"]


def test_one_image_over_the_pixel_step_cap_names_size(tmp_path):
    with serve(tmp_path, max_pixel_steps=128 * 128 * 4 - 1) as client:
        wait_ready(client)
        error = assert_envelope(
            client.post(GEN, json={"prompt": "x", "size": "128x128", "num_inference_steps": 4}), 400, "size"
        )
        assert "one 128x128 image with 4 steps" in error["message"]
        assert_still_serves(client)


def test_pixel_step_cap_applies_to_streams_too(tmp_path):
    with serve(tmp_path, max_pixel_steps=64 * 64 * 4) as client:
        wait_ready(client)
        payload = {"prompt": "x", "n": 2, "size": "64x64", "num_inference_steps": 4, "stream": True}
        assert_envelope(client.post(GEN, json=payload), 400, "n")


def test_default_cap_fits_ten_1024_images_at_100_steps_but_not_ten_2048_images():
    settings = Settings(_env_file=None)
    check_cost(10, 1024, 1024, 100, settings)
    with pytest.raises(InvalidRequest) as refused:
        check_cost(10, 2048, 2048, 100, settings)
    assert refused.value.param == "n"
    assert "n can be at most 2" in refused.value.message


def test_a_seed_whose_images_run_past_the_largest_seed_is_a_400_whatever_max_n_allows(tmp_path):
    """Image k uses seed + k: the bound follows n (a setting), not a schema constant."""
    runner = FakeRunner()
    with serve(tmp_path, runner, max_n=12) as client:
        wait_ready(client)
        largest = 2**32 - 1
        response = client.post(GEN, json={"prompt": "x", "size": "32x32", "n": 12, "seed": largest - 10})
        error = assert_envelope(response, 400, param="seed", code="invalid_value")
        assert str(largest - 11) in error["message"]
        assert_still_serves(client)
        fits = client.post(GEN, json={"prompt": "x", "size": "32x32", "n": 12, "seed": largest - 11})
        assert fits.status_code == 200, fits.text
        assert [item["seed"] for item in fits.json()["data"]][-1] == largest
