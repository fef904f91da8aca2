"""The client's async side as users run it: ``--async``, ``jobs list|show|cancel|wait`` and
``--loras``, a ``diffuser-api`` process against the fake model under uvicorn."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import pytest
from PIL import Image

from tests.fakes import FakeRunner, colour_of
from tests.integration.test_cli import (
    assert_serves_afterwards,
    cli_command,
    cli_environment,
    image_file,
    run_cli,
    run_in_terminal,
    wait_until,
)

pytestmark = pytest.mark.slow

FAST_JOBS = {"job_poll_s": 0.05}


def job_of(server, job_id: str) -> dict:
    return httpx.get(f"{server.base_url}/v1/images/jobs/{job_id}", timeout=10).json()


def wait_until_line(process: subprocess.Popen, wanted: str) -> None:
    """Read the client's plain lines up to ``wanted``: it follows the job from there on."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.rstrip("\n") == wanted:
            return
    raise AssertionError(f"the client ended before printing {wanted!r}")


def submit(server, *args: str) -> str:
    submitted = run_cli(*args, "--async", "--server", server.base_url, "-q")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("imgjob_") and "\n" not in job_id  # -q: the id alone, for scripts
    return job_id


def test_async_generate_exits_at_once_and_jobs_wait_shows_the_steps_and_saves_the_images(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.05)
    server = serve(runner, **FAST_JOBS)
    runner.gate.clear()  # the job waits: --async must not
    job_id = submit(server, "generate", "a lighthouse", "-n", "2", "--seed", "21", "--steps", "12",
                    "--size", "32x32", "--format", "webp")
    assert job_of(server, job_id)["status"] in ("queued", "in_progress")
    waiting = subprocess.Popen(cli_command("jobs", "wait", job_id, "--server", server.base_url,
                                           "-o", str(tmp_path / "out")),
                               env=cli_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiting.stdout is not None
        first, attached = waiting.stdout.readline(), waiting.stdout.readline()
        runner.gate.set()  # the job held at its start: every step comes live
        rest = waiting.stdout.read()
        assert waiting.wait(30) == 0
    finally:
        runner.gate.set()
        if waiting.poll() is None:
            waiting.kill()
    assert (first, attached) == (f"job {job_id}: waiting for the server\n", "running\n")
    paths = [tmp_path / "out" / "generate-21.webp", tmp_path / "out" / "generate-22.webp"]
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("WEBP", (32, 32))
            pixel = image.convert("RGB").getpixel((0, 0))
        expected = colour_of("a lighthouse", int(path.stem.split("-")[1]))
        assert all(abs(got - want) <= 3 for got, want in zip(pixel, expected, strict=True))  # webp is lossy
        assert f"saved {path} (seed {path.stem.split('-')[1]})" in rest
    assert "step 12/12" in rest and "steps/s" in rest  # the job's events drive the same display as generate's
    assert sorted((tmp_path / "out").iterdir()) == paths
    # Saved from the stream's completed events: the final job's image urls were never fetched.
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert "/images/files/jobs/" not in metrics and 'endpoint="/v1/images/jobs/{job_id}/events"' in metrics


def test_jobs_wait_json_and_a_format_and_prefix_of_its_own(serve, tmp_path):
    server = serve(FakeRunner(), **FAST_JOBS)
    job_id = submit(server, "vary", str(image_file(tmp_path / "in.png", (32, 32))), "--seed", "3")
    waited = run_cli("jobs", "wait", job_id, "--server", server.base_url, "--format", "jpeg", "--prefix", "v",
                     "-o", str(tmp_path), "--json")
    assert waited.returncode == 0, waited.stderr
    answer = json.loads(waited.stdout)
    path = tmp_path / "v-3.jpeg"
    assert answer == {"job": job_id, "status": "completed", "output_format": "jpeg",
                      "images": [{"file": str(path), "seed": 3, "revised_prompt": None}]}
    with Image.open(path) as image:
        assert image.format == "JPEG"


def test_async_edit_sends_its_images_and_mask(serve, tmp_path):
    runner = FakeRunner()
    server = serve(runner, **FAST_JOBS)
    source = image_file(tmp_path / "in.png", (32, 32))
    mask = image_file(tmp_path / "mask.png", (32, 32), mode="RGBA")
    job_id = submit(server, "edit", str(source), "--prompt", "a boat", "--mask", str(mask), "--seed", "8")
    waited = run_cli("jobs", "wait", job_id, "--server", server.base_url, "-o", str(tmp_path / "out"), "-q")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.split() == [str(tmp_path / "out" / "edit-8.png")]
    job = runner.jobs_seen[0]
    assert job.prompt == "a boat" and job.mask is not None and job.images[0].getpixel((0, 0))[:3] == (200, 30, 30)


def test_ctrl_c_while_waiting_leaves_the_job_running(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.05)
    server = serve(runner, **FAST_JOBS)
    runner.gate.clear()  # the job starts once its watcher is there
    job_id = submit(server, "generate", "long", "--steps", "60", "--size", "32x32")
    process = subprocess.Popen(cli_command("jobs", "wait", job_id, "--server", server.base_url, "-o", str(tmp_path)),
                               env=cli_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        wait_until_line(process, "running")
        runner.gate.set()
        for line in process.stdout:
            if line.startswith("step 3/60"):
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr is not None
    said = process.stderr.read()
    assert f"job {job_id} keeps running" in said and f"diffuser-api jobs wait {job_id}" in said
    wait_until(lambda: job_of(server, job_id)["status"] == "completed", "the job to finish without its watcher")
    assert runner.batch_of("long").steps == 60
    resumed = run_cli("jobs", "wait", job_id, "--server", server.base_url, "-o", str(tmp_path), "-q")
    assert (resumed.returncode, resumed.stdout.strip()) == (0, str(next(tmp_path.glob("generate-*.png"))))


def test_list_show_and_cancel(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.1)
    server = serve(runner, **FAST_JOBS)
    runner.gate.clear()  # the first job holds at its start until cancelled
    first = submit(server, "generate", "first", "--steps", "100", "--size", "32x32")
    second = submit(server, "generate", "second", "--size", "32x32")
    listed = run_cli("jobs", "list", "--server", server.base_url, "-q")
    assert (listed.returncode, listed.stdout.split()) == (0, [second, first])  # newest first
    page = json.loads(run_cli("jobs", "list", "--limit", "1", "--server", server.base_url, "--json").stdout)
    assert ([job["id"] for job in page["data"]], page["has_more"]) == ([second], True)
    rest = run_cli("jobs", "list", "--after", second, "--server", server.base_url)
    assert rest.stdout.startswith(f"{first}\t")
    wait_until(lambda: runner.started("first"), "the first job to run")
    shown = run_cli("jobs", "show", first, "--server", server.base_url)
    assert shown.returncode == 0 and shown.stdout.startswith(f"{first}: in_progress (generations, model fake-model)")
    cancelled = run_cli("jobs", "cancel", first, "--server", server.base_url, "-q")
    assert cancelled.returncode == 0, cancelled.stderr
    runner.gate.set()
    wait_until(lambda: job_of(server, first)["status"] == "cancelled", "the cancel to reach the running job")
    assert runner.batch_of("first").steps < 100
    # Waiting for a cancelled job ends as its error would have ended a request.
    waited = run_cli("jobs", "wait", first, "--server", server.base_url, "-o", str(tmp_path / "out"))
    assert waited.returncode == 3
    assert "error: the job was cancelled" in waited.stderr and "cancelled" in waited.stderr
    assert not (tmp_path / "out").exists()
    # Cancelling a finished job is the server's 409, with its message.
    wait_until(lambda: job_of(server, second)["status"] == "completed", "the second job")
    again = run_cli("jobs", "cancel", second, "--server", server.base_url)
    assert again.returncode == 3 and "HTTP 409" in again.stderr and "param: job_id" in again.stderr


def test_an_unknown_job_exits_3_with_the_servers_envelope(serve, tmp_path):
    server = serve(FakeRunner(), **FAST_JOBS)
    for action in ("show", "wait", "cancel"):
        result = run_cli("jobs", action, "imgjob_nope", "--server", server.base_url, "--json")
        assert result.returncode == 3, (action, result.stderr)
        error = json.loads(result.stdout)["error"]
        assert error["status"] == 404 and error["param"] == "job_id" and "imgjob_nope" in error["message"]
        assert error["type"] == "invalid_request_error" and error["code"] and error["request_id"]
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_an_async_request_the_server_refuses_stores_no_job(serve, tmp_path):
    server = serve(FakeRunner(), **FAST_JOBS)
    result = run_cli("generate", "a cat", "--async", "--size", "13x7", "--server", server.base_url)
    assert result.returncode == 3
    assert "13x7" in result.stderr and "param: size" in result.stderr and "HTTP 400" in result.stderr
    assert httpx.get(f"{server.base_url}/v1/images/jobs", timeout=10).json()["data"] == []
    assert_serves_afterwards(server.base_url, tmp_path / "after")


# One per way a body travels: the WebSocket message, JSON over HTTP, a multipart form.
@pytest.mark.parametrize("command", ["generate", "edit --async", "vary --async"])
def test_loras_go_in_the_body_and_the_servers_refusal_is_printed(serve, tmp_path, command):
    """The fake model has no adapters: the server names ``loras`` as the bad field, which it
    can only do if the body (JSON, WebSocket message or multipart form) carried it."""
    server = serve(FakeRunner(), **FAST_JOBS)
    name, *flags = command.split()
    inputs = {"generate": ["a cat"], "edit": [str(image_file(tmp_path / "in.png", (32, 32))), "--prompt", "p"],
              "vary": [str(image_file(tmp_path / "in.png", (32, 32)))]}[name]
    result = run_cli(name, *inputs, *flags, "--loras", "pixel-art:0.6,film-grain", "--server", server.base_url,
                     "-o", str(tmp_path / "out"), "--json")
    assert result.returncode == 3, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["param"] == "loras" and error["type"] == "invalid_request_error"
    assert error["message"] and error["code"] and error["request_id"]
    assert "param: loras" in result.stderr
    assert not (tmp_path / "out").exists()
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_jobs_wait_in_a_terminal_draws_the_progress(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.1)
    server = serve(runner, **FAST_JOBS)
    runner.gate.clear()
    job_id = submit(server, "generate", "watched", "--steps", "8", "--size", "32x32", "--seed", "4")

    def start_once_attached(written: bytes) -> None:
        if b"running" in written:
            runner.gate.set()

    code, written = run_in_terminal(cli_command("jobs", "wait", job_id, "--server", server.base_url,
                                                "-o", str(tmp_path)), on_output=start_once_attached)
    assert code == 0, written
    assert "\x1b[" in written  # redrawn in place, not plain lines
    assert "8/8" in written and "steps/s" in written
    assert (tmp_path / "generate-4.png").is_file()
