"""The HTTP contract with a fake model: status codes, envelopes, fields, and recovery."""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffuser_api.domain import Task
from diffuser_api.engine import EngineLimits
from tests.fakes import ALL_BUT_MULTI, FAKE_EXTRAS, FakeRunner, colour_of, fake_app, png_bytes

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
VAR = "/v1/images/variations"


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "model never became ready"
        time.sleep(0.01)


@pytest.fixture()
def client(tmp_path):
    with TestClient(fake_app(tmp_path)) as test_client:
        wait_ready(test_client)
        yield test_client


def assert_envelope(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def assert_still_serves(client: TestClient) -> None:
    response = client.post(GEN, json={"prompt": "still alive", "size": "32x32"})
    assert response.status_code == 200, response.text


def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_generation_returns_n_seeded_images(client):
    response = client.post(GEN, json={"prompt": "a fox", "n": 2, "size": "32x16", "seed": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output_format"] == "png" and "size" not in body  # 32x16 is not in OpenAI's enum
    assert [item["seed"] for item in body["data"]] == [7, 8]
    for item in body["data"]:
        image = decode(item)
        assert image.size == (32, 16)
        assert image.getpixel((0, 0)) == colour_of("a fox", item["seed"])
        assert item["revised_prompt"] == "a fox"


def test_same_seed_same_pixels_and_random_seeds_differ(client):
    first = client.post(GEN, json={"prompt": "x", "seed": 3}).json()["data"][0]
    again = client.post(GEN, json={"prompt": "x", "seed": 3}).json()["data"][0]
    assert first["b64_json"] == again["b64_json"]
    unseeded = [client.post(GEN, json={"prompt": "x"}).json()["data"][0]["seed"] for _ in range(3)]
    assert len(set(unseeded)) == 3


def test_auto_size_is_model_default_and_openai_names_route_to_default(client):
    for model in (None, "dall-e-2", "dall-e-3", "gpt-image-1", "fake-model"):
        payload = {"prompt": "x", "size": "auto"} | ({"model": model} if model else {})
        response = client.post(GEN, json=payload)
        assert response.status_code == 200, response.text
        assert decode(response.json()["data"][0]).size == (32, 32)


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_formats(client, output_format):
    response = client.post(GEN, json={"prompt": "x", "output_format": output_format, "output_compression": 50})
    assert response.json()["output_format"] == output_format
    assert decode(response.json()["data"][0]).format == output_format.upper()


def test_url_response_downloads_and_unknown_names_are_404(client):
    response = client.post(GEN, json={"prompt": "x", "response_format": "url"}, headers={"host": "images.test"})
    url = response.json()["data"][0]["url"]
    assert url.startswith("http://images.test/v1/images/files/")
    path = url.removeprefix("http://images.test")
    download = client.get(path)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (32, 32)
    for bad in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "nothere.png", "%2Fetc%2Fpasswd"):
        assert_envelope(client.get(f"/v1/images/files/{bad}"), 404)


def test_forwarded_headers_only_from_trusted_proxies(tmp_path):
    """The right-most value is the one the trusted proxy (the peer) set; from anyone else, none count."""
    forwarded = {"x-forwarded-proto": "http, https", "x-forwarded-host": "evil.example, cdn.example"}
    for peer, expected in (("10.0.0.5", "https://cdn.example/"), ("198.51.100.1", "http://testserver/")):
        app = fake_app(tmp_path, trusted_proxies=["10.0.0.0/8"])
        with TestClient(app, client=(peer, 50000)) as client:
            wait_ready(client)
            response = client.post(GEN, json={"prompt": "x", "response_format": "url"}, headers=forwarded)
            assert response.json()["data"][0]["url"].startswith(expected)
            assert_still_serves(client)


def test_public_base_url_setting(tmp_path):
    with TestClient(fake_app(tmp_path, public_base_url="https://img.example.com/")) as client:
        wait_ready(client)
        url = client.post(GEN, json={"prompt": "x", "response_format": "url"}).json()["data"][0]["url"]
        assert url.startswith("https://img.example.com/v1/images/files/")


@pytest.mark.parametrize(
    ("payload", "param", "code"),
    [
        ({"prompt": "x", "size": "13x7"}, "size", "invalid_value"),
        ({"prompt": "x", "size": "big"}, "size", "invalid_value"),
        ({"prompt": "x", "size": "4096x4096"}, "size", "invalid_value"),
        ({"prompt": "x", "n": 0}, "n", "invalid_value"),
        ({"prompt": "x", "n": 11}, "n", "invalid_value"),
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": "   "}, "prompt", "missing_required_parameter"),
        ({"prompt": "x", "bogus": 1}, "bogus", "unknown_parameter"),
        ({"prompt": "x", "true_cfg_scale": 4.0}, "true_cfg_scale", "unsupported_parameter"),
        ({"prompt": "x", "strength": 0.5}, "strength", "unsupported_parameter"),
        ({"prompt": "x", "background": "transparent"}, "background", "invalid_value"),
        ({"prompt": "x", "stream": True, "response_format": "url"}, "response_format", "invalid_value"),
        ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images", "invalid_value"),
        ({"prompt": "x", "partial_images": 2}, "partial_images", "invalid_value"),
        ({"prompt": "x", "output_compression": 50}, "output_compression", "invalid_value"),
        ({"prompt": "x", "quality": "ultra"}, "quality", "invalid_value"),
        ({"prompt": "x", "response_format": "gif"}, "response_format", "invalid_value"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "invalid_value"),
        ({"prompt": "x", "seed": -1}, "seed", "invalid_value"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"prompt": "x", "size": "\uff16\uff14x64"}, "size", "invalid_value"),  # full-width digits
        ({"prompt": "x", "size": "64x64\n"}, "size", "invalid_value"),
    ],
)
def test_bad_generation_requests(client, payload, param, code):
    assert_envelope(client.post(GEN, json=payload), 400, param, code)
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n", "2", "expected an integer, but got a string"),
        ("n", True, "expected an integer, but got a boolean"),
        ("n", 2.0, "expected an integer, but got a decimal number"),
        ("stream", "yes", "expected a boolean, but got a string"),
        ("num_inference_steps", True, "expected an integer, but got a boolean"),
        ("guidance_scale", "7.5", "expected a number, but got a string"),
        ("seed", "7", "expected an integer, but got a string"),
        ("partial_images", False, "expected an integer, but got a boolean"),
        ("size", 256, "expected a string, but got an integer"),
        ("loras", [{"name": "ink", "scale": "0.5"}], "expected a number, but got a string"),
    ],
)
def test_a_json_body_s_values_are_not_converted_to_the_field_s_type(client, field, value, message):
    """As OpenAI's API: ``"n": "2"`` is not two images, ``"stream": "yes"`` not a stream."""
    error = assert_envelope(client.post(GEN, json={"prompt": "x", field: value}), 400, code="invalid_type")
    assert error["param"].split(".")[0] == field and message in error["message"]
    assert client.post(GEN, json={"prompt": "x", "guidance_scale": 7}).status_code == 200  # an integer is a number
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("body", "param"),
    [(b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
     (b'{"prompt": "x", "loras": [{"name": "ink", "scale": Infinity}]}', "loras.0.scale")],
)
def test_nan_and_infinity_are_refused_not_compared(client, body, param):
    """Python's JSON reader takes NaN and Infinity, and NaN passes no bound: no number here."""
    response = client.post(GEN, content=body, headers={"content-type": "application/json"})
    assert "finite number" in assert_envelope(response, 400, param, "invalid_value")["message"]
    assert_still_serves(client)


def test_a_json_body_that_is_not_an_object_says_so(client):
    response = client.post(GEN, content=b"[]", headers={"content-type": "application/json"})
    error = assert_envelope(response, 400, code="invalid_type")
    assert error["message"] == "Invalid type for the request body: expected an object, but got an array instead."
    assert_still_serves(client)


def test_a_form_sent_to_a_json_route_is_told_to_send_json(client):
    error = assert_envelope(client.post(GEN, data={"prompt": "x"}), 400, code="invalid_content_type")
    assert "application/json" in error["message"]
    assert_still_serves(client)


def test_a_form_s_text_values_are_still_read_as_their_types(client):
    """Multipart carries every value as text: there "2" is two images."""
    files = {"image": ("x.png", png_bytes(), "image/png")}
    response = client.post(EDIT, data={"prompt": "x", "n": "2", "strength": "0.5", "seed": "3"}, files=files)
    assert response.status_code == 200, response.text
    assert [image["seed"] for image in response.json()["data"]] == [3, 4]


def test_unknown_model_is_404_and_strict_names(client, tmp_path):
    assert_envelope(client.post(GEN, json={"prompt": "x", "model": "sdxl-turbo"}), 404, "model", "model_not_found")
    with TestClient(fake_app(tmp_path, strict_model_names=True)) as strict:
        wait_ready(strict)
        assert_envelope(strict.post(GEN, json={"prompt": "x", "model": "dall-e-3"}), 404, "model", "model_not_found")


def test_relaxed_unknown_fields(tmp_path):
    with TestClient(fake_app(tmp_path, allow_unknown_fields=True)) as client:
        wait_ready(client)
        assert client.post(GEN, json={"prompt": "x", "bogus": 1}).status_code == 200


def test_informational_fields_are_accepted(client):
    payload = {
        "prompt": "x",
        "user": "u1",
        "style": "vivid",
        "moderation": "low",
        "quality": "high",
        "background": "auto",
    }
    response = client.post(GEN, json=payload)
    assert response.status_code == 200 and response.json()["quality"] == "high"


def test_quality_maps_to_steps_unless_steps_given(tmp_path):
    runner = FakeRunner()
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        client.post(GEN, json={"prompt": "a", "quality": "low"})
        client.post(GEN, json={"prompt": "b", "quality": "high"})
        client.post(GEN, json={"prompt": "c", "quality": "high", "num_inference_steps": 9})
    assert [job.steps for job in runner.jobs_seen] == [2, 6, 9]


def test_invalid_json_unknown_path_and_wrong_method(client):
    response = client.post(GEN, content=b"{not json", headers={"content-type": "application/json"})
    assert_envelope(response, 400)
    assert_envelope(client.get("/v1/nothing"), 404)
    assert_envelope(client.get(GEN), 405)
    assert_still_serves(client)


def test_request_id_round_trips(client):
    response = client.post(GEN, json={"prompt": "x"}, headers={"x-request-id": "my-id-123"})
    assert response.headers["x-request-id"] == "my-id-123"
    error = client.post(GEN, json={}, headers={"x-request-id": "bad id with spaces"})
    assert error.headers["x-request-id"].startswith("req_")
    assert error.json()["error"]["request_id"] == error.headers["x-request-id"]


def test_edit_multipart_single_image_and_mask(tmp_path):
    runner = FakeRunner()
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        files = {"image": ("upload", png_bytes((40, 24)), "application/octet-stream")}
        response = client.post(EDIT, data={"prompt": "blue", "n": "2", "strength": "0.5"}, files=files)
        assert response.status_code == 200, response.text
        assert decode(response.json()["data"][0]).size == (40, 24)  # auto = the input's size
        mask = png_bytes((40, 24), (0, 0, 0, 0), "RGBA")
        files = [("image[]", ("a.png", png_bytes((40, 24)), "image/png")), ("mask", ("m.png", mask, "image/png"))]
        response = client.post(EDIT, data={"prompt": "blue", "size": "32x32"}, files=files)
        assert response.status_code == 200, response.text
    edit, masked = runner.jobs_seen
    assert (edit.task, edit.n, edit.strength) == (Task.EDIT, 2, 0.5)
    assert masked.task is Task.MASKED_EDIT and masked.mask.size == (32, 32) and masked.images[0].size == (32, 32)
    assert masked.mask.getpixel((0, 0)) == 255  # transparent in OpenAI's mask = repaint for diffusers


def test_input_fidelity_high_lowers_strength_where_there_is_one(tmp_path):
    runner = FakeRunner()
    files = {"image": ("a.png", png_bytes(), "image/png")}
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        for fidelity in ("low", "high"):
            assert client.post(EDIT, data={"prompt": "x", "input_fidelity": fidelity}, files=files).status_code == 200
    assert [job.strength for job in runner.jobs_seen] == [0.8, pytest.approx(0.48)]
    with TestClient(fake_app(tmp_path, extras=FAKE_EXTRAS - {"strength"})) as client:
        wait_ready(client)
        response = client.post(EDIT, data={"prompt": "x", "input_fidelity": "high"}, files=files)
        assert_envelope(response, 400, "input_fidelity", "invalid_value")
        assert client.post(EDIT, data={"prompt": "x", "input_fidelity": "low"}, files=files).status_code == 200


def test_edit_json_body_with_data_urls(client):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    response = client.post(EDIT, json={"prompt": "x", "images": [{"image_url": data_url}]})
    assert response.status_code == 200, response.text
    for images, param in (
        ([{"file_id": "file-1"}], "images"),
        ([{"image_url": "https://example.com/cat.png"}], "images"),
        ([{"image_url": "data:image/png;base64,%%%"}], "images"),
        ([], "images"),
    ):
        assert_envelope(client.post(EDIT, json={"prompt": "x", "images": images}), 400, param)
    assert_still_serves(client)


def test_several_images_is_501_when_model_cannot(client):
    files = [("image[]", ("a.png", png_bytes(), "image/png")), ("image[]", ("b.png", png_bytes(), "image/png"))]
    response = client.post(EDIT, data={"prompt": "x"}, files=files)
    error = assert_envelope(response, 501, code="not_supported")
    assert error["type"] == "not_supported_error" and "several images" in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({}, {"prompt": "x"}, 400, "image"),
        ({"image": ("x.png", b"not an image at all", "image/png")}, {"prompt": "x"}, 400, "image"),
        ({"image": ("x.png", png_bytes()[:60], "image/png")}, {"prompt": "x"}, 400, "image"),
        ({"image": ("x.png", png_bytes(), "image/png")}, {}, 400, "prompt"),
        (
            {
                "image": ("x.png", png_bytes(), "image/png"),
                "mask": ("m.png", png_bytes((8, 8), (0, 0, 0, 0), "RGBA"), "image/png"),
            },
            {"prompt": "x"},
            400,
            "mask",
        ),
        (
            {"image": ("x.png", png_bytes(), "image/png"), "mask": ("m.png", png_bytes(), "image/png")},
            {"prompt": "x"},
            400,
            "mask",
        ),
        (
            {"image": ("x.png", png_bytes(), "image/png")},
            {"prompt": "x", "strength": "0.1", "num_inference_steps": "4"},
            400,
            "strength",
        ),
        ({"image": ("x.png", png_bytes(), "image/png")}, {"prompt": "x", "n": "two"}, 400, "n"),
        ({"image": ("x.png", png_bytes(), "image/png")}, {"prompt": "x", "wat": "1"}, 400, "wat"),
        ({"image": ("x.png", png_bytes(), "image/png")}, {"prompt": "x", "size": "30x30"}, 400, "size"),
    ],
)
def test_bad_edit_requests(client, files, data, status, param):
    assert_envelope(client.post(EDIT, data=data, files=files or None), status, param)
    assert_still_serves(client)


def test_edit_needs_multipart_or_json(client):
    assert_envelope(client.post(EDIT, content=b"prompt=x", headers={"content-type": "text/plain"}), 400)


def test_upload_too_large_is_413(tmp_path):
    with TestClient(fake_app(tmp_path, max_upload_bytes=1000)) as client:
        wait_ready(client)
        big = png_bytes((300, 300), (1, 2, 3))
        noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
        buffer = io.BytesIO()
        noisy.save(buffer, format="PNG")
        for payload in (big, buffer.getvalue()):
            if len(payload) <= 1000:
                continue
            response = client.post(EDIT, data={"prompt": "x"}, files={"image": ("x.png", payload, "image/png")})
            assert_envelope(response, 413, "image", "payload_too_large")
        assert_still_serves(client)


def test_decompression_bomb_is_400(tmp_path):
    with TestClient(fake_app(tmp_path, max_input_pixels=100 * 100)) as client:
        wait_ready(client)
        bomb = png_bytes((2000, 2000), (0, 0, 0))
        response = client.post(EDIT, data={"prompt": "x"}, files={"image": ("x.png", bomb, "image/png")})
        error = assert_envelope(response, 400, "image", "invalid_image")
        assert "decompression bomb" in error["message"]
        assert_still_serves(client)


def test_variation_takes_image_without_prompt(tmp_path):
    runner = FakeRunner()
    with TestClient(fake_app(tmp_path, runner, variation_prompt="", variation_strength=0.6)) as client:
        wait_ready(client)
        response = client.post(VAR, data={"n": "2", "seed": "1"}, files={"image": ("u", png_bytes(), "image/png")})
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 2
        assert_envelope(client.post(VAR, data={"n": "1"}), 400, "image")
        assert_envelope(
            client.post(VAR, data={"prompt": "x"}, files={"image": ("u", png_bytes(), "image/png")}),
            400,
            "prompt",
            "unknown_parameter",
        )
    job = runner.jobs_seen[0]
    assert (job.task, job.prompt, job.strength) == (Task.VARIATION, "", 0.6)


def test_disabled_task_is_501(tmp_path):
    with TestClient(fake_app(tmp_path, disabled_tasks=["variation"])) as client:
        wait_ready(client)
        response = client.post(VAR, files={"image": ("u", png_bytes(), "image/png")})
        assert_envelope(response, 501, code="not_supported")
        assert client.get("/").json()["models"][0]["endpoints"]["variations"]["supported"] is False


def test_mask_with_several_images_is_501_not_ignored(tmp_path):
    with TestClient(fake_app(tmp_path, tasks=frozenset(Task))) as client:
        wait_ready(client)
        files = [("image[]", ("a.png", png_bytes(), "image/png")), ("image[]", ("b.png", png_bytes(), "image/png"))]
        assert client.post(EDIT, data={"prompt": "x"}, files=files).status_code == 200
        mask = ("mask", ("m.png", png_bytes(colour=(0, 0, 0, 0), mode="RGBA"), "image/png"))
        response = client.post(EDIT, data={"prompt": "x"}, files=[*files, mask])
        error = assert_envelope(response, 501, code="not_supported")
        assert "mask" in error["message"]
        assert_still_serves(client)


def test_model_without_generation_is_501(tmp_path):
    with TestClient(fake_app(tmp_path, tasks=ALL_BUT_MULTI - {Task.GENERATION})) as client:
        wait_ready(client)
        assert_envelope(client.post(GEN, json={"prompt": "x"}), 501, code="not_supported")


def test_pipeline_failure_is_500_and_next_request_works(tmp_path):
    runner = FakeRunner(fail_on={"explode": RuntimeError("fake pipeline exploded")})
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        error = assert_envelope(client.post(GEN, json={"prompt": "explode"}), 500)
        assert error["type"] == "server_error" and error["request_id"] in error["message"]
        assert_still_serves(client)


def test_health_is_503_while_loading_and_a_request_waits_for_the_load(tmp_path):
    gate = threading.Event()
    with TestClient(fake_app(tmp_path, load_gate=gate)) as client:
        error = assert_envelope(client.get("/health"), 503)
        assert "loading" in error["message"]
        answers: list = []
        waiting = threading.Thread(target=lambda: answers.append(client.post(GEN, json={"prompt": "x"})))
        waiting.start()
        time.sleep(0.2)
        assert answers == [] and client.get("/").json()["models"][0]["status"] == "loading"
        gate.set()
        waiting.join(10)
        assert answers[0].status_code == 200, answers[0].text
        wait_ready(client)
        assert_still_serves(client)


def test_full_queue_is_429_with_retry_after(tmp_path):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    limits = EngineLimits(max_queue_size=1, max_batch_size=1, request_timeout_s=10)
    app = fake_app(tmp_path, runner, limits=limits)
    with TestClient(app) as client:
        gate.set()
        wait_ready(client)
        gate.clear()
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda p=p: results.append(client.post(GEN, json={"prompt": p}).status_code))
            for p in ("running", "queued")
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        response = client.post(GEN, json={"prompt": "rejected"})
        assert_envelope(response, 429, code="rate_limit_exceeded")
        assert float(response.headers["retry-after"]) >= 1
        gate.set()
        for thread in threads:
            thread.join(10)
        assert results == [200, 200]
        assert_still_serves(client)


def test_models_endpoints_and_service_info(client):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list" and listing["data"][0]["id"] == "fake-model"
    assert client.get("/v1/models/fake-model").json()["object"] == "model"
    assert_envelope(client.get("/v1/models/nope"), 404, "model", "model_not_found")
    info = client.get("/").json()["models"][0]
    assert info["endpoints"]["edits"] == {"supported": True, "mask": True, "multiple_images": False, "max_images": 1}
    assert info["endpoints"]["variations"]["method"]
    assert client.get("/docs").status_code == 200
