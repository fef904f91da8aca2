"""``diffuser-api batch submit|show|cancel|wait`` as users run it: a ``diffuser-api`` process
against a real server (tiny-sd under ``diffuser-api serve`` for the files, the fake model
under uvicorn for refusals, cancels and Ctrl-C)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import LiveServer
from tests.fakes import FakeRunner
from tests.integration.test_cli import (
    assert_serves_afterwards,
    cli_command,
    cli_environment,
    run_cli,
    run_in_terminal,
    wait_until,
)

pytestmark = pytest.mark.slow

FAST_JOBS = {"job_poll_s": 0.05}
GENERATIONS = "/v1/images/generations"


def batch_file(path: Path, bodies: dict[str, dict]) -> Path:
    """A JSONL file of generations, one line per ``custom_id``."""
    path.write_text("".join(json.dumps({"custom_id": custom_id, "method": "POST", "url": GENERATIONS, "body": body})
                            + "\n" for custom_id, body in bodies.items()))
    return path


def batch_of(server, batch_id: str) -> dict:
    return httpx.get(f"{server.base_url}/v1/batches/{batch_id}", timeout=10).json()


def submit(server, path: Path) -> str:
    submitted = run_cli("batch", "submit", str(path), "--server", server.base_url, "-q")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert batch_id.startswith("batch_") and "\n" not in batch_id  # -q: the id alone, for scripts
    return batch_id


def test_submit_wait_writes_each_lines_images_from_tiny_sd(tiny_sd_server: LiveServer, tmp_path):
    source = batch_file(tmp_path / "cubes.jsonl", {
        "red": {"prompt": "a red cube", "size": "64x64", "num_inference_steps": 2, "seed": 5},
        "blue": {"prompt": "a blue cube", "size": "64x64", "num_inference_steps": 2, "seed": 9, "n": 2},
        "green": {"prompt": "a green cube", "size": "64x64", "num_inference_steps": 2, "seed": 1,
                  "output_format": "jpeg"},
    })
    result = run_cli("batch", "submit", str(source), "--wait", "--poll-s", "0.2", "--server", tiny_sd_server.base_url,
                     "-o", str(tmp_path / "out"), timeout=240)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    expected = {"red-5.png": "PNG", "blue-9.png": "PNG", "blue-10.png": "PNG", "green-1.jpeg": "JPEG"}
    assert sorted(path.name for path in out.iterdir()) == sorted(expected)
    for name, image_format in expected.items():
        with Image.open(out / name) as image:
            assert (image.format, image.size) == (image_format, (64, 64))
        assert f"saved {out / name} (seed {name.split('-')[1].split('.')[0]})" in result.stdout
    assert result.stdout.splitlines()[-5].endswith("completed: 3/3 done")  # the last state, then the 4 files
    assert result.stderr == ""


def test_failed_lines_are_printed_and_exit_3_while_the_others_are_saved(serve, tmp_path):
    server = serve(FakeRunner(), **FAST_JOBS)
    source = batch_file(tmp_path / "in.jsonl", {
        "good": {"prompt": "a cat", "size": "32x32", "seed": 2},
        "odd-size": {"prompt": "a dog", "size": "13x7"},
        "../escape": {"prompt": "a bird", "size": "32x32", "seed": 4},
    })
    out = tmp_path / "deep" / "out"
    result = run_cli("batch", "submit", str(source), "--wait", "--poll-s", "0.1", "--server", server.base_url,
                     "-o", str(out), "--json")
    assert result.returncode == 3, result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == "completed"
    assert answer["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    # A custom_id with a path in it names a file inside the output folder, never outside it.
    assert [image["file"] for image in answer["images"]] == [str(out / "good-2.png"), str(out / ".._escape-4.png")]
    assert sorted(path.name for path in out.iterdir()) == [".._escape-4.png", "good-2.png"]
    assert not (tmp_path / "deep" / "escape-4.png").exists()
    [failed] = answer["failed"]
    assert (failed["custom_id"], failed["status_code"], failed["param"], failed["code"]) == (
        "odd-size", 400, "size", "invalid_value")
    assert "13x7" in failed["message"]
    assert result.stderr.startswith("failed odd-size: ") and "13x7" in result.stderr
    assert "(param size, HTTP 400, invalid_value)" in result.stderr
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_a_bad_file_prints_its_line_numbered_errors(serve, tmp_path):
    server = serve(FakeRunner(), **FAST_JOBS)
    source = tmp_path / "bad.jsonl"
    good = {"custom_id": "a", "method": "POST", "url": GENERATIONS, "body": {"prompt": "p", "size": "32x32"}}
    source.write_text(json.dumps(good) + "\nnot json\n" + json.dumps({"custom_id": "b", "url": GENERATIONS,
                                                                     "body": {}}) + "\n")
    result = run_cli("batch", "submit", str(source), "--wait", "--poll-s", "0.1", "--server", server.base_url,
                     "-o", str(tmp_path / "out"))
    assert result.returncode == 3
    assert result.stderr.splitlines() == ["line 2: this line is not valid JSON",
                                          "line 3: Missing required parameter: 'method'. (param method)"]
    assert "failed: 0/0 done" in result.stdout
    assert not (tmp_path / "out").exists()
    # --json: the server's errors as they are, for scripts.
    batch_id = result.stdout.split()[1]
    shown = run_cli("batch", "show", batch_id, "--server", server.base_url, "--json")
    assert shown.returncode == 0
    errors = json.loads(shown.stdout)["errors"]["data"]
    assert [(error["line"], error["code"], error["param"]) for error in errors] == [
        (2, "invalid_json_line", None), (3, "missing_required_parameter", "method")]
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_show_and_cancel_then_wait_reports_the_lines_never_run(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.05)
    server = serve(runner, **FAST_JOBS)
    runner.gate.clear()  # the first line holds at its start until the batch is cancelled
    # More lines than the dispatcher hands the engine at once: the rest wait their turn.
    batch_id = submit(server, batch_file(tmp_path / "in.jsonl", {
        f"line-{index}": {"prompt": f"p{index}", "size": "32x32", "num_inference_steps": 4} for index in range(40)}))
    wait_until(lambda: runner.started("p0"), "the first line to run")
    shown = run_cli("batch", "show", batch_id, "--server", server.base_url)
    assert shown.returncode == 0
    assert shown.stdout.startswith(f"{batch_id}: in_progress: 0/40 done ({GENERATIONS})")
    cancelled = run_cli("batch", "cancel", batch_id, "--server", server.base_url)
    assert (cancelled.returncode, cancelled.stdout) == (0, f"batch {batch_id}: cancel asked, now cancelling\n")
    runner.gate.set()
    waited = run_cli("batch", "wait", batch_id, "--poll-s", "0.1", "--server", server.base_url,
                     "-o", str(tmp_path / "out"), "--json")
    assert waited.returncode == 3, waited.stderr
    answer = json.loads(waited.stdout)
    assert answer["status"] == "cancelled"
    never_run = [line for line in answer["failed"] if line["code"] == "batch_cancelled"]
    assert never_run and all(f"failed {line['custom_id']}: " in waited.stderr for line in never_run)
    assert len(answer["images"]) + len(answer["failed"]) == 40
    # A completed batch cannot be cancelled: the server's 409, with its message and param.
    one = batch_file(tmp_path / "one.jsonl", {"one": {"prompt": "p", "size": "32x32"}})
    done = run_cli("batch", "submit", str(one), "--wait", "--poll-s", "0.1", "--server", server.base_url,
                   "-o", str(tmp_path / "one"), "--json")
    assert done.returncode == 0, done.stderr
    again = run_cli("batch", "cancel", json.loads(done.stdout)["batch"], "--server", server.base_url)
    assert again.returncode == 3 and "HTTP 409" in again.stderr and "param: batch_id" in again.stderr


def test_an_unknown_batch_exits_3_with_the_servers_envelope(serve, tmp_path):
    server = serve(FakeRunner(), **FAST_JOBS)
    for action in ("show", "wait", "cancel"):
        result = run_cli("batch", action, "batch_nope", "--server", server.base_url, "--json")
        assert result.returncode == 3, (action, result.stderr)
        error = json.loads(result.stdout)["error"]
        assert error["status"] == 404 and error["param"] == "batch_id" and "batch_nope" in error["message"]
        assert error["type"] == "invalid_request_error" and error["code"] and error["request_id"]
    missing = run_cli("batch", "submit", str(tmp_path / "none.jsonl"), "--server", server.base_url)
    assert missing.returncode == 1 and str(tmp_path / "none.jsonl") in missing.stderr
    assert_serves_afterwards(server.base_url, tmp_path / "after")


def test_ctrl_c_while_waiting_leaves_the_batch_running(serve, tmp_path):
    runner = FakeRunner()
    server = serve(runner, **FAST_JOBS)
    runner.gate.clear()
    source = batch_file(tmp_path / "in.jsonl", {"only": {"prompt": "held", "size": "32x32", "seed": 6}})
    process = subprocess.Popen(cli_command("batch", "submit", str(source), "--wait", "--poll-s", "0.1",
                                           "--server", server.base_url, "-o", str(tmp_path)),
                               env=cli_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "in_progress" in line:
                batch_id = line.split()[1]
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr is not None
    said = process.stderr.read()
    assert f"batch {batch_id} keeps running" in said and f"diffuser-api batch wait {batch_id}" in said
    assert batch_of(server, batch_id)["status"] == "in_progress"
    runner.gate.set()
    resumed = run_cli("batch", "wait", batch_id, "--poll-s", "0.1", "--server", server.base_url, "-o", str(tmp_path),
                      "-q")
    assert (resumed.returncode, resumed.stdout) == (0, f"{tmp_path / 'only-6.png'}\n")


def test_batch_wait_in_a_terminal_draws_a_bar(serve, tmp_path):
    runner = FakeRunner(step_delay_s=0.02)
    server = serve(runner, **FAST_JOBS)
    batch_id = submit(server, batch_file(tmp_path / "in.jsonl", {
        f"n{index}": {"prompt": f"p{index}", "size": "32x32", "seed": index} for index in range(3)}))
    code, written = run_in_terminal(cli_command("batch", "wait", batch_id, "--poll-s", "0.1",
                                                "--server", server.base_url, "-o", str(tmp_path / "out")))
    assert code == 0, written
    assert "\x1b[" in written  # redrawn in place, not plain lines
    assert "3/3" in written and f"batch {batch_id}: completed" in written
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["n0-0.png", "n1-1.png", "n2-2.png"]
