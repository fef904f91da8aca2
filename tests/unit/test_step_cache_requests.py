"""The ``step_cache`` request field: defaults, choices, and refusals with the OpenAI envelope."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from diffuser_api.domain import STEP_CACHE_OFF, Endpoint, ImageRequest, StepCache, StepCacheMethod
from diffuser_api.errors import InvalidRequest
from diffuser_api.service.validation import resolve_step_cache
from tests.fakes import FakeRunner, fake_app, fake_capabilities, png_bytes
from tests.unit.test_api import EDIT, GEN, assert_envelope, assert_still_serves, wait_ready

FLUX_LIKE = dataclasses.replace(
    fake_capabilities(),
    step_caches=frozenset({StepCacheMethod.FIRST_BLOCK_CACHE, StepCacheMethod.TAYLORSEER, StepCacheMethod.MAGCACHE}),
    default_step_cache=StepCache(StepCacheMethod.FIRST_BLOCK_CACHE, threshold=0.12),
)


def request(step_cache: str | None) -> ImageRequest:
    return ImageRequest(endpoint=Endpoint.GENERATIONS, prompt="x", step_cache=step_cache)


def test_a_request_without_step_cache_gets_the_models_default():
    assert resolve_step_cache(request(None), FLUX_LIKE, "m") == FLUX_LIKE.default_step_cache
    assert resolve_step_cache(request(None), fake_capabilities(), "m") == STEP_CACHE_OFF


def test_the_models_own_method_keeps_its_threshold_and_another_gets_diffusers_defaults():
    assert resolve_step_cache(request("first_block_cache"), FLUX_LIKE, "m").threshold == 0.12
    assert resolve_step_cache(request("taylorseer"), FLUX_LIKE, "m") == StepCache(StepCacheMethod.TAYLORSEER)
    assert resolve_step_cache(request("off"), FLUX_LIKE, "m") == STEP_CACHE_OFF


def test_a_method_the_model_lacks_is_refused_naming_step_cache_and_the_choices():
    no_magcache = dataclasses.replace(FLUX_LIKE, step_caches=frozenset({StepCacheMethod.TAYLORSEER}))
    with pytest.raises(InvalidRequest) as raised:
        resolve_step_cache(request("magcache"), no_magcache, "model 'q' (qwen-image)")
    assert raised.value.param == "step_cache"
    assert raised.value.message == (
        "step_cache 'magcache' is not available on model 'q' (qwen-image); choose one of: off, taylorseer"
    )


@pytest.fixture()
def client(tmp_path):
    runner = FakeRunner()
    with TestClient(fake_app(tmp_path, runner)) as test_client:
        wait_ready(test_client)
        test_client.runner = runner
        yield test_client


def test_step_cache_on_a_model_without_cache_hooks_is_a_400(client):
    response = client.post(GEN, json={"prompt": "x", "size": "32x32", "step_cache": "first_block_cache"})
    error = assert_envelope(response, 400, param="step_cache", code="unsupported_parameter")
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "step_cache 'first_block_cache' is not available on model 'fake-model' (fake); " \
                               "choose one of: off"
    assert_still_serves(client)


def test_an_unknown_step_cache_is_a_400_naming_it(client):
    response = client.post(GEN, json={"prompt": "x", "size": "32x32", "step_cache": "teacache"})
    error = assert_envelope(response, 400, param="step_cache")
    assert "'off', 'first_block_cache', 'taylorseer' or 'magcache'" in error["message"]
    assert_still_serves(client)


def test_a_multipart_edit_refuses_step_cache_the_same_way(client):
    response = client.post(EDIT, data={"prompt": "x", "step_cache": "taylorseer"},
                           files={"image": ("a.png", png_bytes(), "image/png")})
    assert_envelope(response, 400, param="step_cache", code="unsupported_parameter")
    assert_still_serves(client)


def test_step_cache_off_is_accepted_everywhere_and_reaches_the_job(client):
    response = client.post(GEN, json={"prompt": "plain", "size": "32x32", "step_cache": "off"})
    assert response.status_code == 200, response.text
    assert client.runner.batch_of("plain").jobs[0].step_cache == STEP_CACHE_OFF
