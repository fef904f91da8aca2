"""The command-line client as users run it: a ``diffuser-api`` process against a real server.

Fast, controllable cases (exit codes, Ctrl-C, the terminal display) use the fake model under
uvicorn, whose runner counts its steps; the files themselves come from the tiny-sd pipeline.
"""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from diffuser_api.domain import Task
from tests.conftest import LiveServer, free_port
from tests.fakes import FakeRunner, png_bytes

pytestmark = pytest.mark.slow

CLIENT_ENVIRONMENT_VARIABLES = ("DIFFUSER_API_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY")


def cli_environment(**extra: str) -> dict[str, str]:
    """This test's settings only: a developer's own server URL or key must not leak in."""
    environment = {name: value for name, value in os.environ.items() if name not in CLIENT_ENVIRONMENT_VARIABLES}
    return environment | extra


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffuser_api", *args]


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), env=cli_environment(**env), capture_output=True, text=True,
                          timeout=timeout)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def image_file(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> Path:
    path.write_bytes(png_bytes(size, (200, 30, 30, 255)[: len(mode)], mode))
    return path


def assert_serves_afterwards(server_url: str, output: Path) -> None:
    """A failed request leaves the server (and the client's next run) working."""
    after = run_cli("generate", "after", "--server", server_url, "--size", "32x32", "--seed", "3", "-o", str(output),
                    "-q")
    assert after.returncode == 0, after.stderr
    assert after.stdout.split() == [str(output / "generate-3.png")]


# --- files from a real pipeline ------------------------------------------------------------------


def test_generate_writes_the_images_named_by_seed_in_the_asked_format(tiny_sd_server: LiveServer, tmp_path):
    result = run_cli("generate", "a red cube", "--server", tiny_sd_server.base_url, "-n", "2", "--seed", "7",
                     "--size", "64x64", "--steps", "2", "--format", "jpeg", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "out" / "generate-7.jpeg", tmp_path / "out" / "generate-8.jpeg"]
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (64, 64))
        assert f"saved {path} (seed {path.stem.split('-')[1]})" in result.stdout  # not a terminal: plain lines
    assert "step 2/2" in result.stdout
    assert sorted((tmp_path / "out").iterdir()) == paths


def test_edit_with_a_mask_and_json_output(tiny_sd_server: LiveServer, tmp_path):
    source = image_file(tmp_path / "in.png")
    mask = image_file(tmp_path / "mask.png", mode="RGBA")
    result = run_cli("edit", str(source), "--prompt", "a blue cube", "--mask", str(mask), "--server",
                     tiny_sd_server.base_url, "--seed", "11", "--steps", "2", "--format", "webp", "--prefix", "cube",
                     "-o", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)  # the whole stdout is the one JSON object
    path = tmp_path / "cube-11.webp"
    assert answer["images"] == [{"file": str(path), "seed": 11, "revised_prompt": "a blue cube"}]
    assert answer["output_format"] == "webp"
    with Image.open(path) as image:
        assert (image.format, image.size) == ("WEBP", (64, 64))


def test_vary_over_http_reencodes_to_the_asked_format_and_reports_the_response(tiny_sd_server: LiveServer, tmp_path):
    source = image_file(tmp_path / "in.png")
    result = run_cli("vary", str(source), "--server", f"{tiny_sd_server.base_url}/v1", "--seed", "5", "--steps", "2",
                     "-n", "2", "--format", "jpeg", "-o", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    paths = [tmp_path / "out" / "vary-5.jpeg", tmp_path / "out" / "vary-6.jpeg"]
    assert [image["file"] for image in answer["images"]] == [str(path) for path in paths]
    assert [image["seed"] for image in answer["images"]] == [5, 6]
    assert isinstance(answer["created"], int) and answer["output_format"] == "jpeg"
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG"


def test_edit_sends_every_image(serve, tmp_path):
    runner = FakeRunner()
    server = serve(runner, tasks=frozenset(Task))
    first = image_file(tmp_path / "a.png", (32, 32))
    second = tmp_path / "b.png"
    second.write_bytes(png_bytes((32, 32), (0, 90, 0)))
    result = run_cli("edit", str(first), str(second), "--prompt", "both", "--server",
                     server.base_url, "--seed", "2", "-o", str(tmp_path / "out"), "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'out' / 'edit-2.png'}\n"
    job = runner.jobs_seen[0]
    assert (job.task, job.prompt) == (Task.MULTI_IMAGE_EDIT, "both")
    assert [image.getpixel((0, 0))[:3] for image in job.images] == [(200, 30, 30), (0, 90, 0)]


# --- listing models ------------------------------------------------------------------------------


def test_models_lists_ids_and_status(serve):
    server = serve()
    plain = run_cli("models", "--server", server.base_url)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == ["fake-model\tready"]
    as_json = run_cli("models", "--server", server.base_url, "--json")
    assert [model["id"] for model in json.loads(as_json.stdout)["data"]] == ["fake-model"]


def test_server_and_key_come_from_the_environment(serve, tmp_path):
    server = serve(api_keys=["sk-right"])
    refused = run_cli("models", OPENAI_BASE_URL=f"{server.base_url}/v1")
    assert refused.returncode == 3
    assert "error: You didn't provide an API key" in refused.stderr
    listed = run_cli("models", "-q", DIFFUSER_API_URL=server.base_url, OPENAI_API_KEY="sk-right")
    assert (listed.returncode, listed.stdout) == (0, "fake-model\n")


# --- errors and exit codes -----------------------------------------------------------------------


def test_bad_size_exits_3_with_the_servers_message_and_param(serve, tmp_path):
    server = serve()
    result = run_cli("generate", "a cat", "--server", server.base_url, "--size", "13x7", "-o", str(tmp_path))
    assert result.returncode == 3
    assert "13x7" in result.stderr.splitlines()[0]
    assert "param: size" in result.stderr
    assert "invalid_request_error" in result.stderr and "request id " in result.stderr
    assert list(tmp_path.glob("*.png")) == []
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_error_in_json_mode_prints_the_envelope(serve, tmp_path):
    server = serve()
    result = run_cli("vary", str(image_file(tmp_path / "in.png", (32, 32))), "--server", server.base_url,
                     "--size", "13x7", "--json")
    assert result.returncode == 3
    error = json.loads(result.stdout)["error"]
    assert error["status"] == 400 and error["param"] == "size" and error["type"] == "invalid_request_error"
    assert "13x7" in error["message"] and error["code"] and error["request_id"]


def test_unknown_model_exits_3(serve, tmp_path):
    server = serve()
    result = run_cli("generate", "a cat", "--server", server.base_url, "--model", "no-such-model", "-o", str(tmp_path))
    assert result.returncode == 3
    assert "no-such-model" in result.stderr and "param: model" in result.stderr
    assert "model_not_found" in result.stderr
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_disabled_variations_exit_4(serve, tmp_path):
    server = serve(disabled_tasks=["variation"])
    result = run_cli("vary", str(image_file(tmp_path / "in.png", (32, 32))), "--server", server.base_url,
                     "-o", str(tmp_path / "out"))
    assert result.returncode == 4
    assert "HTTP 501" in result.stderr
    assert not (tmp_path / "out").exists()
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_no_server_exits_5(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there
    source = str(image_file(tmp_path / "in.png"))
    for command in (["generate", "a cat", "-o", str(tmp_path)], ["vary", source, "-o", str(tmp_path)], ["models"]):
        result = run_cli(*command, "--server", url, timeout=30)
        assert result.returncode == 5, (command, result.stderr)
        assert f"could not reach the server at {url}/v1" in result.stderr


def test_usage_errors_exit_2(tmp_path):
    assert run_cli("generate", "a cat", "--format", "gif").returncode == 2
    assert run_cli("edit", str(tmp_path / "missing.png"), "--prompt", "x").returncode == 2
    assert run_cli("generate", "a cat", "--server", "ftp://example.com").returncode == 2


# --- live progress and cancellation --------------------------------------------------------------


def test_ctrl_c_cancels_the_work_on_the_server_and_exits_130(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.1)
    server = serve(runner)
    process = subprocess.Popen(
        cli_command("generate", "slow", "--server", server.base_url, "--steps", "90", "--size", "32x32",
                    "-o", str(tmp_path / "out")),
        env=cli_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # plain lines: stdout is a pipe
            if line.startswith("step 3/90"):
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr is not None and "cancelled" in process.stderr.read()
    batch = runner.batch_of("slow")
    wait_until(lambda: batch.finished_at is not None, "the server to stop the cancelled work")
    assert 3 <= batch.steps < 90
    stopped_at = batch.steps
    time.sleep(0.3)  # three more step times: a worker still running would have moved on
    assert batch.steps == stopped_at
    started = time.monotonic()
    response = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "next", "size": "32x32"},
                          timeout=30)
    assert response.status_code == 200
    assert time.monotonic() - started < 5, "the worker stayed busy after the client left"
    assert not (tmp_path / "out").exists()  # (tmp_path/server holds the server's own files)


def test_ctrl_c_during_a_variation_closes_the_request_and_the_server_stops(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.1)
    server = serve(runner)
    process = subprocess.Popen(
        cli_command("vary", str(image_file(tmp_path / "in.png", (32, 32))), "--server", server.base_url,
                    "--steps", "90", "--size", "32x32", "-o", str(tmp_path / "out")),
        env=cli_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: bool(runner.batches) and runner.batches[0].steps >= 3, "the variation to run")
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130
    finally:
        if process.poll() is None:
            process.kill()
    batch = runner.batches[0]
    wait_until(lambda: batch.finished_at is not None, "the server to stop the cancelled work")
    assert batch.steps < 90
    assert not (tmp_path / "out").exists()


def run_in_terminal(command: list[str], timeout_s: float = 60,
                    on_output: Callable[[bytes], None] | None = None) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as stdout and stderr; its exit code and all it wrote.
    ``on_output`` sees all it wrote so far after each read (to act when something appears)."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, env=cli_environment(COLUMNS="120", TERM="xterm-256color"),
                               stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    written = io.BytesIO()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            written.write(chunk)
            if on_output is not None:
                on_output(written.getvalue())
        return process.wait(10), written.getvalue().decode(errors="replace")
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()


def test_progress_in_a_terminal_shows_the_steps(serve, tmp_path):
    server = serve(FakeRunner(step_delay_s=0.25))
    code, written = run_in_terminal(
        cli_command("generate", "watched", "--server", server.base_url, "--steps", "8", "--size", "32x32",
                    "--seed", "4", "-o", str(tmp_path))
    )
    assert code == 0, written
    assert "\x1b[" in written  # drawn with terminal control sequences, not plain lines
    for step in range(1, 9):
        assert f"{step}/8" in written
    assert "steps/s" in written
    assert f"saved {tmp_path / 'generate-4.png'} (seed 4)" in written.replace("\r\n", "\n").replace("\n", "")
    assert (tmp_path / "generate-4.png").is_file()


def test_queue_position_is_reported(serve, tmp_path):
    runner = FakeRunner()
    server = serve(runner)
    runner.gate.clear()
    blocker = subprocess.Popen(cli_command("generate", "blocker", "--server", server.base_url, "--size", "32x32",
                                           "-o", str(tmp_path), "-q"), env=cli_environment())
    try:
        wait_until(lambda: runner.started("blocker"), "the blocker to start")
        waiting = subprocess.Popen(cli_command("generate", "waiting", "--server", server.base_url, "--size", "40x40",
                                               "-o", str(tmp_path)), env=cli_environment(),
                                   stdout=subprocess.PIPE, text=True)
        assert waiting.stdout is not None
        first = waiting.stdout.readline()
        runner.gate.set()
        rest = waiting.stdout.read()
        assert waiting.wait(30) == 0 and blocker.wait(30) == 0
    finally:
        runner.gate.set()
        for process in (blocker,):
            if process.poll() is None:
                process.kill()
    assert first == "queued: position 0\n"
    assert "step 4/4" in rest and "saved" in rest
