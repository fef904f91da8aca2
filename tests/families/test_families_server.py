"""Every family through a live server with its tiny model, driven by the official openai SDK.

The seven servers start at once (they mostly wait on imports) and live for the session.
Each supported endpoint must return the requested size, each unsupported one a 501; seeds
reproduce; the family's size multiple and parameter rules answer 400 naming the parameter.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import LiveServer
from tests.integration.test_openai_sdk import expect_error, noise_png, pixels

pytestmark = pytest.mark.slow

STEPS = 2
G, E, M, X, V = "generation", "edit", "masked", "multi", "variation"


@dataclass(frozen=True)
class Expect:
    family: str
    tasks: frozenset[str]
    size: tuple[int, int]  # honoured by this family but not by a coarser multiple
    bad_size: str  # a multiple of 8 this family refuses
    multiple: int


EXPECTED = {
    "tiny-sdxl": Expect("sdxl", frozenset({G, E, M, V}), (72, 64), "100x100", 8),
    "tiny-sd3": Expect("sd3", frozenset({G, E, M, V}), (80, 64), "72x64", 16),
    "tiny-flux": Expect("flux", frozenset({G, E, M, V}), (80, 64), "72x64", 16),
    "tiny-flux-kontext": Expect("flux-kontext", frozenset({G, E, M}), (80, 64), "72x64", 16),
    "tiny-qwen-image": Expect("qwen-image", frozenset({G, E, M, V}), (80, 64), "72x64", 16),
    "tiny-qwen-image-edit": Expect("qwen-image-edit", frozenset({E, M}), (96, 64), "80x64", 32),
    "tiny-qwen-image-edit-plus": Expect("qwen-image-edit-plus", frozenset({E, X}), (80, 64), "72x64", 16),
}


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LiveServer]]:
    started = {model: LiveServer(tmp_path_factory.mktemp(model), model) for model in EXPECTED}
    try:
        for server in started.values():
            server.wait_ready(timeout=300)
        yield started
    finally:
        for server in started.values():
            server.stop()


def client_for(servers: dict[str, LiveServer], model: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{servers[model].base_url}/v1", api_key="sk-test", max_retries=0, timeout=120)


def mask_png(size: tuple[int, int]) -> bytes:
    """Transparent (to repaint) left half, opaque right half."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def calls(client: openai.OpenAI, size: tuple[int, int], **extra) -> dict[str, Callable[[], object]]:
    """One call per task, each at ``size`` with the family's defaults otherwise."""
    text = f"{size[0]}x{size[1]}"
    body = {"num_inference_steps": STEPS, **extra}
    image = noise_png(size)
    return {
        G: lambda: client.images.generate(prompt="a red fox", size=text, extra_body=body),
        E: lambda: client.images.edit(image=image, prompt="make it blue", size=text, extra_body=body),
        M: lambda: client.images.edit(image=image, mask=mask_png(size), prompt="a cat", size=text, extra_body=body),
        X: lambda: client.images.edit(image=[image, noise_png(size, seed=1)], prompt="both", size=text,
                                      extra_body=body),
        V: lambda: client.images.create_variation(image=image, size=text, extra_body=body),
    }


def first_pixels(result) -> np.ndarray:
    return pixels(result.data[0].b64_json)


@pytest.mark.parametrize("model", list(EXPECTED))
def test_every_endpoint_answers_per_family(servers, model):
    expect = EXPECTED[model]
    client = client_for(servers, model)
    width, height = expect.size
    for task, call in calls(client, expect.size).items():
        if task in expect.tasks:
            assert first_pixels(call()).shape == (height, width, 3), task
        else:
            error = expect_error(call, 501)
            assert error.type == "not_supported_error" and expect.family in error.message, task


@pytest.mark.parametrize("model", list(EXPECTED))
def test_seeds_reproduce(servers, model):
    expect = EXPECTED[model]
    task = G if G in expect.tasks else E
    client = client_for(servers, model)
    first, again = (first_pixels(calls(client, (64, 64), seed=7)[task]()) for _ in range(2))
    other = first_pixels(calls(client, (64, 64), seed=8)[task]())
    assert np.abs(first - again).max() <= 2
    assert np.abs(first - other).max() > 2


@pytest.mark.parametrize("model", list(EXPECTED))
def test_sizes_off_the_family_multiple_are_refused(servers, model):
    expect = EXPECTED[model]
    client = client_for(servers, model)
    call = client.images.generate if G in expect.tasks else client.images.edit
    kwargs = {} if G in expect.tasks else {"image": noise_png()}
    error = expect_error(lambda: call(prompt="x", size=expect.bad_size, **kwargs), 400, "size")
    assert f"multiples of {expect.multiple}" in error.message and expect.family in error.message


def qwen_edit(client: openai.OpenAI, **extra) -> np.ndarray:
    body = {"num_inference_steps": STEPS, "seed": 3, **extra}
    return first_pixels(client.images.edit(image=noise_png(), prompt="a boat", size="64x64", extra_body=body))


def test_qwen_image_edit_honours_true_cfg_and_negative_prompt(servers):
    client = client_for(servers, "tiny-qwen-image-edit")
    base = qwen_edit(client, true_cfg_scale=4.0, negative_prompt="blurry")
    assert np.abs(base - qwen_edit(client, true_cfg_scale=2.0, negative_prompt="blurry")).max() > 2
    assert np.abs(base - qwen_edit(client, true_cfg_scale=4.0, negative_prompt="green sky")).max() > 2
    assert np.abs(base - qwen_edit(client, true_cfg_scale=1.0)).max() > 2


def test_qwen_image_edit_refuses_what_it_would_ignore(servers):
    client = client_for(servers, "tiny-qwen-image-edit")
    for extra, param in [
        ({"true_cfg_scale": 4.0}, "true_cfg_scale"),  # true CFG with no negative prompt is skipped
        ({"true_cfg_scale": 1.0, "negative_prompt": "x"}, "negative_prompt"),
        ({"guidance_scale": 3.0}, "guidance_scale"),  # no guidance embedding
        ({"strength": 0.5}, "strength"),  # the edit pipeline takes none (masked edits do)
    ]:
        error = expect_error(lambda extra=extra: qwen_edit(client, **extra), 400, param)
        assert "qwen-image-edit" in error.message


def test_refused_parameters_name_parameter_and_family(servers):
    cases = [
        ("tiny-flux", {"negative_prompt": "fog"}, "negative_prompt"),  # true CFG is off by default
        ("tiny-sdxl", {"guidance_scale": 1.0, "negative_prompt": "fog"}, "negative_prompt"),
        ("tiny-sd3", {"true_cfg_scale": 2.0}, "true_cfg_scale"),
        ("tiny-flux-kontext", {"strength": 0.5}, "strength"),
    ]
    for model, extra, param in cases:
        call = calls(client_for(servers, model), (64, 64), **extra)[E]
        error = expect_error(call, 400, param)
        assert EXPECTED[model].family in error.message


def test_plus_edits_two_images_together(servers):
    client = client_for(servers, "tiny-qwen-image-edit-plus")

    def edit(second: bytes) -> np.ndarray:
        result = client.images.edit(image=[noise_png((80, 64)), second], prompt="merge", size="80x64",
                                    extra_body={"num_inference_steps": STEPS, "seed": 1})
        return first_pixels(result)

    one, other = edit(noise_png((80, 64), seed=1)), edit(noise_png((80, 64), seed=2))
    assert one.shape == (64, 80, 3)
    assert np.abs(one - other).max() > 2, "the second image does not count"
    error = expect_error(lambda: client.images.edit(image=[noise_png()] * 4, prompt="x"), 400, "image")
    assert "at most 3" in error.message


def test_service_info_names_the_family(servers):
    for model, expect in EXPECTED.items():
        described = httpx.get(f"{servers[model].base_url}/", timeout=30).json()["models"][0]
        assert described["family"] == expect.family
        assert described["endpoints"]["generations"]["supported"] == (G in expect.tasks)


def test_each_model_reports_its_preview_mode(servers):
    """The tiny SD-type models have the real VAEs' channel counts (4, 4, 16): latent-map previews;
    the tiny Flux and Qwen VAEs have 4 channels where the maps need 16: the VAE fallback, said why."""
    for model, expect in EXPECTED.items():
        previews = httpx.get(f"{servers[model].base_url}/v1/models/{model}", timeout=30).json()["previews"]
        latent = expect.family in ("sdxl", "sd3")
        assert previews["mode"] == ("latent" if latent else "vae"), model
        if not latent:
            assert "4 latent channels" in previews["method"] and "needs 16" in previews["method"]


@pytest.mark.parametrize("model", sorted(EXPECTED))
def test_streamed_previews_decode_at_the_requested_size(servers, model):
    """Each family unpacks its own latents (Flux and Qwen pack them) for previews."""
    client = client_for(servers, model)
    expect = EXPECTED[model]
    text = f"{expect.size[0]}x{expect.size[1]}"
    body = {"num_inference_steps": 4}
    if G in expect.tasks:
        events = list(client.images.generate(prompt="a fox", size=text, stream=True, partial_images=1, extra_body=body))
    else:
        events = list(client.images.edit(image=noise_png(expect.size), prompt="a fox", size=text, stream=True,
                                         partial_images=1, extra_body=body))
    assert [event.type.rsplit(".", 1)[1] for event in events] == ["partial_image", "completed"]
    preview, final = (pixels(event.b64_json) for event in events)
    assert preview.shape == final.shape == (expect.size[1], expect.size[0], 3)
    assert np.abs(preview - final).max() > 2
