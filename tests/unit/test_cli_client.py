"""The client's pure parts: server address, error envelopes, progress words, file names, options."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from diffuser_api.cli import parse_args
from diffuser_api.client.commands import edit_body, generation_body, image_fields, run_client_command
from diffuser_api.client.events import sse_events
from diffuser_api.client.failures import ExitCode, refusal_from
from diffuser_api.client.http import form_fields
from diffuser_api.client.progress import LineDisplay, step_words
from diffuser_api.client.saving import SavedImage, save_image
from diffuser_api.client.server import resolve_server
from tests.fakes import png_bytes

# --- where the server is -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, api_base",
    [
        ("http://gpu-box:8000", "http://gpu-box:8000/v1"),
        ("http://gpu-box:8000/", "http://gpu-box:8000/v1"),
        ("http://gpu-box:8000/v1/", "http://gpu-box:8000/v1"),  # OPENAI_BASE_URL's shape
        ("https://example.com/images-api/v1", "https://example.com/images-api/v1"),
        ("localhost:9000", "http://localhost:9000/v1"),
    ],
)
def test_a_url_without_a_path_is_a_server_root_and_one_with_a_path_the_api_base(given, api_base):
    assert resolve_server(given, None, environ={}).api_base == api_base


def test_flags_win_over_the_environment_and_diffuser_api_url_over_openai_base_url():
    environ = {"DIFFUSER_API_URL": "http://a:1", "OPENAI_BASE_URL": "http://b:2/v1", "OPENAI_API_KEY": "sk-env"}
    assert resolve_server(None, None, environ) == resolve_server("http://a:1", "sk-env", {})
    assert resolve_server("http://c:3", "sk-flag", environ).api_key == "sk-flag"
    assert resolve_server(None, None, {"OPENAI_BASE_URL": "http://b:2/v1"}).api_base == "http://b:2/v1"
    assert resolve_server(None, None, {}).api_base == "http://127.0.0.1:8000/v1"
    assert resolve_server(None, None, {}).headers == {}


def test_the_websocket_url_follows_the_scheme_and_the_key_goes_in_the_header():
    assert resolve_server("http://a:1", None, {}).websocket_url("images/ws") == "ws://a:1/v1/images/ws"
    secure = resolve_server("https://a/v1", "sk-1", {})
    assert secure.websocket_url("images/ws") == "wss://a/v1/images/ws"
    assert secure.headers == {"Authorization": "Bearer sk-1"}


def test_a_url_that_is_not_http_is_a_usage_error(capsys):
    with pytest.raises(ValueError, match="http"):
        resolve_server("ftp://example.com", None, {})
    assert run_client_command(parse_args(["models", "--server", "ftp://example.com"])) == ExitCode.USAGE
    assert "error: --server must be an http(s) URL" in capsys.readouterr().err


# --- the server's errors -------------------------------------------------------------------------

ENVELOPE = {"error": {"message": "size '13x7' is not WxH", "type": "invalid_request_error", "param": "size",
                      "code": "invalid_value", "request_id": "req-1"}}


@pytest.mark.parametrize(
    "status, error_type, exit_code",
    [
        (400, "invalid_request_error", ExitCode.CLIENT_ERROR),
        (429, "requests", ExitCode.CLIENT_ERROR),
        (501, "not_supported_error", ExitCode.SERVER_ERROR),
        (500, "server_error", ExitCode.SERVER_ERROR),
        # On the WebSocket errors come without a status: the type tells the side.
        (None, "invalid_request_error", ExitCode.CLIENT_ERROR),
        (None, "requests", ExitCode.CLIENT_ERROR),
        (None, "not_supported_error", ExitCode.SERVER_ERROR),
        (None, "server_error", ExitCode.SERVER_ERROR),
        (None, "timeout_error", ExitCode.SERVER_ERROR),
    ],
)
def test_exit_codes_tell_client_from_server_errors(status, error_type, exit_code):
    body = {"error": ENVELOPE["error"] | {"type": error_type}}
    assert refusal_from(body, status).exit_code == exit_code


def test_the_envelope_is_read_whole_and_described_message_then_param():
    refusal = refusal_from(ENVELOPE, 400)
    assert refusal.envelope() == {"error": ENVELOPE["error"] | {"status": 400}}
    assert refusal.describe() == [
        "error: size '13x7' is not WxH",
        "param: size",
        "(HTTP 400, invalid_request_error/invalid_value, request id req-1)",
    ]


def test_an_answer_without_an_envelope_still_says_what_happened():
    refusal = refusal_from("<html>Bad Gateway</html>", 502)
    assert refusal.message == "the server answered HTTP 502 without an error envelope"
    assert refusal.exit_code == ExitCode.SERVER_ERROR


# --- progress lines ------------------------------------------------------------------------------


def test_step_words_add_rate_and_eta_once_known():
    assert step_words(1, 8, None) == "step 1/8"
    assert step_words(3, 8, 2.5) == "step 3/8 · 2.5 steps/s · ETA 2s"


def test_line_display_times_steps_from_the_first_one():
    now = [100.0]
    stream = io.StringIO()
    display = LineDisplay(stream, clock=lambda: now[0])
    display.waiting("generating")
    display.event({"type": "loading"})
    display.event({"type": "queued", "position": 1})
    for step in (1, 2, 3):
        display.event({"type": "progress", "step": step, "total_steps": 9})
        now[0] += 0.5
    display.event({"type": "partial_image", "b64_json": "..."})
    display.saved(SavedImage(Path("out/generate-4.png"), 4))
    assert stream.getvalue().splitlines() == [
        "generating: waiting for the server",
        "loading the model",
        "queued: position 1",
        "step 1/9",
        "step 2/9 · 2.0 steps/s · ETA 4s",
        "step 3/9 · 2.0 steps/s · ETA 3s",
        "saved out/generate-4.png (seed 4)",
    ]


# --- files ---------------------------------------------------------------------------------------


def test_images_are_named_prefix_seed_format_in_a_folder_made_on_demand(tmp_path):
    data = png_bytes((16, 16))
    saved = save_image(base64.b64encode(data).decode(), 42, tmp_path / "new", "cat", "png", revised_prompt="a cat")
    assert saved == SavedImage(tmp_path / "new" / "cat-42.png", 42, "a cat")
    assert saved.path.read_bytes() == data  # the server's bytes as they came
    assert saved.as_json() == {"file": str(saved.path), "seed": 42, "revised_prompt": "a cat"}


def test_an_image_in_another_format_is_reencoded(tmp_path):
    data = png_bytes((16, 16), (10, 20, 30, 128), mode="RGBA")
    saved = save_image(base64.b64encode(data).decode(), 7, tmp_path, "vary", "jpeg", received_format="png")
    with Image.open(saved.path) as image:
        assert (saved.path.name, image.format, image.mode, image.size) == ("vary-7.jpeg", "JPEG", "RGB", (16, 16))


# --- options -------------------------------------------------------------------------------------


def test_generate_options_become_the_apis_fields():
    args = parse_args(["generate", "a cat", "--model", "sd", "-n", "2", "--size", "64x64", "--steps", "3",
                       "--seed", "9", "--guidance", "4.5", "--negative-prompt", "blur", "--format", "webp"])
    assert generation_body(args) == {
        "prompt": "a cat", "output_format": "webp", "model": "sd", "n": 2, "size": "64x64",
        "num_inference_steps": 3, "seed": 9, "guidance_scale": 4.5, "negative_prompt": "blur",
    }


def test_unset_options_are_left_to_the_server():
    args = parse_args(["vary", __file__])
    assert image_fields(args) == {}
    assert (args.format, str(args.output_dir), args.prefix) == ("png", ".", None)


def test_edit_sends_its_images_and_mask_as_data_urls(tmp_path):
    first, second, mask = (tmp_path / name for name in ("a.png", "b.png", "mask.png"))
    for path, colour in ((first, (1, 2, 3)), (second, (4, 5, 6)), (mask, (0, 0, 0))):
        path.write_bytes(png_bytes((8, 8), colour))
    body = edit_body(parse_args(["edit", str(first), str(second), "--prompt", "p", "--mask", str(mask)]))
    assert (body["endpoint"], body["prompt"], body["output_format"]) == ("edits", "p", "png")
    urls = [image["image_url"] for image in body["images"]] + [body["mask"]["image_url"]]
    assert all(url.startswith("data:image/png;base64,") for url in urls)
    assert [base64.b64decode(url.partition(",")[2]) for url in urls] == [p.read_bytes() for p in (first, second, mask)]


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "a cat", "--format", "gif"],
        ["generate", "a cat", "-n", "0"],
        ["generate", "a cat", "-q", "--json"],
        ["edit", "missing.png", "--prompt", "p"],
        ["edit", __file__],  # no --prompt
        ["vary"],
    ],
)
def test_bad_command_lines_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == ExitCode.USAGE


def test_loras_are_names_with_optional_scales():
    args = parse_args(["generate", "a cat", "--loras", "pixel-art:0.6, film-grain"])
    assert generation_body(args)["loras"] == [{"name": "pixel-art", "scale": 0.6}, {"name": "film-grain"}]
    # A multipart form carries them as their JSON, as the server reads a form's loras.
    assert form_fields({"loras": args.loras, "n": 2}) == {
        "loras": '[{"name": "pixel-art", "scale": 0.6}, {"name": "film-grain"}]', "n": "2"}


@pytest.mark.parametrize("loras", ["pixel-art:bright", ":0.5", "a,,b"])
def test_a_lora_without_a_name_or_with_a_bad_scale_is_a_usage_error(loras, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["generate", "a cat", "--loras", loras])
    assert exit_info.value.code == ExitCode.USAGE
    assert "--loras" in capsys.readouterr().err


def test_jobs_commands_parse():
    args = parse_args(["jobs", "wait", "imgjob_1", "-o", "out", "--format", "jpeg", "--json"])
    assert (args.command, args.action, args.job_id, str(args.output_dir), args.format, args.json) == (
        "jobs", "wait", "imgjob_1", "out", "jpeg", True)
    assert parse_args(["jobs", "list", "--status", "queued"]).status == "queued"
    assert parse_args(["generate", "a cat", "--async"]).run_async
    with pytest.raises(SystemExit):
        parse_args(["jobs", "frobnicate", "imgjob_1"])


def test_sse_events_are_read_by_name_and_pings_skipped():
    lines = ["event: image.job.progress", 'data: {"step": 1}', "", ": ping", "",
             "event: image.job.completed", 'data: {"job":', 'data: {"id": "imgjob_1"}}', ""]
    assert list(sse_events(iter(lines))) == [("image.job.progress", {"step": 1}),
                                             ("image.job.completed", {"job": {"id": "imgjob_1"}})]


def test_serve_still_parses_its_own_flags():
    args = parse_args(["serve", "--port", "9000", "--model-id", "tiny-sd"])
    assert (args.command, args.port, args.model_id) == ("serve", 9000, "tiny-sd")
    assert not hasattr(args, "run")
