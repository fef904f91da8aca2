"""The real server with tiny-sd, driven by the official openai SDK as users drive it."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.fakes import png_bytes

pytestmark = pytest.mark.slow

FAST = {"num_inference_steps": 4}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def noise_png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    values = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def expect_error(call, status: int, param: str | None = None) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value
    assert error.status_code == status, error.body
    assert {"message", "type", "param", "code"} <= set(error.body)
    if param is not None:
        assert error.param == param
    assert error.request_id
    return error


def assert_serves(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="still serving", size="64x64", extra_body=FAST)
    assert pixels(result.data[0].b64_json).shape == (64, 64, 3)


def test_generate_b64(client):
    result = client.images.generate(prompt="a red fox", size="64x64", n=2, extra_body=FAST)
    assert len(result.data) == 2
    seeds = [item.model_extra["seed"] for item in result.data]
    assert seeds[1] == seeds[0] + 1
    first, second = (pixels(item.b64_json) for item in result.data)
    assert first.shape == (64, 64, 3) and np.abs(first - second).max() > 2
    assert result.data[0].revised_prompt == "a red fox"
    assert result.usage.input_tokens_details.text_tokens == result.usage.input_tokens > 0
    assert result.usage.output_tokens == 0


def test_generate_url_downloads(client):
    result = client.images.generate(prompt="a boat", size="128x64", response_format="url", extra_body=FAST)
    download = httpx.get(result.data[0].url, timeout=30)
    assert download.status_code == 200
    assert Image.open(io.BytesIO(download.content)).size == (128, 64)


def test_seed_reproduces_and_is_reported(client):
    args = dict(prompt="a lighthouse", size="64x64", extra_body={**FAST, "seed": 1234})
    first, again = (client.images.generate(**args).data[0] for _ in range(2))
    assert first.model_extra["seed"] == 1234
    assert np.abs(pixels(first.b64_json) - pixels(again.b64_json)).max() <= 2
    other = client.images.generate(prompt="a lighthouse", size="64x64", extra_body={**FAST, "seed": 99})
    assert np.abs(pixels(first.b64_json) - pixels(other.data[0].b64_json)).max() > 2


def test_n_images_reproduce_singly_from_their_seeds(client):
    batch = client.images.generate(prompt="stars", size="64x64", n=2, extra_body={**FAST, "seed": 50})
    single = client.images.generate(prompt="stars", size="64x64", extra_body={**FAST, "seed": 51})
    assert np.abs(pixels(batch.data[1].b64_json) - pixels(single.data[0].b64_json)).max() <= 2


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_formats(client, output_format):
    result = client.images.generate(
        prompt="x", size="64x64", output_format=output_format, output_compression=60, extra_body=FAST
    )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == output_format.upper() and image.size == (64, 64)
    assert result.output_format == output_format


def test_extras_change_the_result(client):
    def run(**extra):
        result = client.images.generate(prompt="a city", size="64x64", extra_body={**FAST, "seed": 5, **extra})
        return pixels(result.data[0].b64_json)

    base = run()
    assert np.abs(base - run(guidance_scale=1.5)).max() > 2
    assert np.abs(base - run(negative_prompt="fog")).max() > 2
    assert np.abs(base - run(num_inference_steps=6)).max() > 2


def test_long_prompt_is_truncated_and_revised_prompt_says_so(client):
    prompt = "a very long prompt " * 20
    result = client.images.generate(prompt=prompt, size="64x64", extra_body=FAST)
    revised = result.data[0].revised_prompt
    assert revised and len(revised) < len(prompt) and prompt.startswith(revised.strip()[:10])


def test_edit_single_image(client):
    result = client.images.edit(image=noise_png((96, 64)), prompt="make it blue", extra_body=FAST)
    assert pixels(result.data[0].b64_json).shape == (64, 96, 3)  # auto keeps the input size
    resized = client.images.edit(image=noise_png(), prompt="x", size="128x128", extra_body={**FAST, "strength": 0.5})
    assert pixels(resized.data[0].b64_json).shape == (128, 128, 3)


def test_edit_strength_changes_the_result(client):
    def run(strength: float) -> np.ndarray:
        result = client.images.edit(image=noise_png(), prompt="x", extra_body={**FAST, "strength": strength, "seed": 1})
        return pixels(result.data[0].b64_json)

    assert np.abs(run(0.5) - run(1.0)).max() > 2


def test_edit_with_mask(client):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    image = noise_png()
    result = client.images.edit(image=image, mask=buffer.getvalue(), prompt="a cat", extra_body={**FAST, "seed": 3})
    edited = pixels(result.data[0].b64_json)
    original = pixels(base64.b64encode(image).decode())
    # The masked-out (opaque) half is kept far closer to the input than the repainted half.
    assert np.abs(edited[:, 40:] - original[:, 40:]).mean() < np.abs(edited[:, :24] - original[:, :24]).mean()


def test_edit_with_two_images_is_501(client):
    error = expect_error(lambda: client.images.edit(image=[noise_png(), noise_png()], prompt="x"), 501)
    assert error.type == "not_supported_error" and error.response.headers["x-should-retry"] == "false"
    assert_serves(client)


def test_variations(client):
    result = client.images.create_variation(image=noise_png(), n=2, extra_body={"seed": 8, **FAST})
    assert len(result.data) == 2
    assert pixels(result.data[0].b64_json).shape == (64, 64, 3)


def test_models_health_and_info(client, tiny_sd_server):
    assert [model.id for model in client.models.list().data] == ["tiny-sd"]
    assert client.models.retrieve("tiny-sd").id == "tiny-sd"
    assert httpx.get(f"{tiny_sd_server.base_url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{tiny_sd_server.base_url}/").json()["models"][0]
    assert info["family"] == "stable-diffusion" and "noise" in info["notes"][0]
    assert info["endpoints"]["variations"]["supported"] and info["endpoints"]["edits"]["mask"]


def test_bad_inputs_answer_with_the_envelope(client):
    image = noise_png()
    cases = [
        (lambda: client.images.generate(prompt="x", size="13x7"), 400, "size"),
        (lambda: client.images.generate(prompt="x", size="4096x4096"), 400, "size"),
        (lambda: client.images.generate(prompt="x", n=11), 400, "n"),
        (lambda: client.images.generate(prompt=""), 400, "prompt"),
        (lambda: client.images.generate(prompt="x", model="no-such-model"), 404, "model"),
        (lambda: client.images.generate(prompt="x", extra_body={"bogus": 1}), 400, "bogus"),
        (lambda: client.images.generate(prompt="x", extra_body={"true_cfg_scale": 4.0}), 400, "true_cfg_scale"),
        (lambda: client.images.generate(prompt="x", background="transparent"), 400, "background"),
        (lambda: client.images.generate(prompt="x", stream=True, response_format="url"), 400, "response_format"),
        (lambda: client.images.edit(image=b"garbage bytes", prompt="x"), 400, "image"),
        (lambda: client.images.edit(image=image, mask=png_bytes((32, 32), (0, 0, 0, 0), "RGBA"), prompt="x"),
         400, "mask"),
        (lambda: client.images.edit(image=image, prompt="x", extra_body={"strength": 0.1, "num_inference_steps": 4}),
         400, "strength"),
        (lambda: client.images.edit(image=noise_png((400, 400)), prompt="x"), 413, "image"),
        (lambda: client.images.create_variation(image=b"\x89PNG\r\n\x1a\n broken"), 400, "image"),
    ]
    for call, status, param in cases:
        expect_error(call, status, param)
    assert_serves(client)


def test_decompression_bomb_is_refused(client):
    bomb = png_bytes((9000, 9000), (0, 0, 0))  # 81 Mpx of zeros compresses to a few kB
    error = expect_error(lambda: client.images.edit(image=bomb, prompt="x"), 400, "image")
    assert "decompression bomb" in error.message
    assert_serves(client)
