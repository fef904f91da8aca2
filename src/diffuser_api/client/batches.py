"""``diffuser-api batch submit|show|cancel|wait``: OpenAI's Batch API from the command line.

``submit`` uploads a JSONL file (purpose ``batch``) and creates the batch; ``--wait`` (or
``batch wait ID`` later) polls it until it ends, then reads its output file and writes each
line's images as ``<custom_id>-<seed>.<format>``, and its error file's lines on stderr. A
batch does not depend on a connection: Ctrl-C only stops watching.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from diffuser_api.client.batch_progress import BatchDisplay, batch_display, counts_of, progress_words
from diffuser_api.client.failures import SomeLinesFailed
from diffuser_api.client.http import (
    cancel_batch,
    create_batch,
    file_content,
    get_batch,
    image_b64,
    upload_batch_file,
)
from diffuser_api.client.output import EXIT_CODES_HELP, Output
from diffuser_api.client.saving import SavedImage, save_image
from diffuser_api.client.server import Server
from diffuser_api.client.watching import (
    BATCH,
    action_adder,
    report_status,
    report_submitted,
    stop_watching_on_ctrl_c,
)

ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "expired"})
# A custom_id is the file author's text: only these characters reach a file name.
UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]")

BATCH_EXIT_CODES_HELP = EXIT_CODES_HELP + "  (a batch some of whose lines did not complete also exits 3)\n"


def add_batch_command(commands: Any, connection: argparse.ArgumentParser) -> None:
    batch = commands.add_parser("batch", help="submit a JSONL file to the Batch API, show, cancel or wait for a batch",
                                description="Batches: a JSONL file of image requests, run without a connection.")
    actions = batch.add_subparsers(dest="action", required=True, metavar="{submit,show,cancel,wait}")
    add = action_adder(actions, connection, BATCH_EXIT_CODES_HELP)

    def add_waiting_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output-dir", type=Path, default=Path("."),
                            help="folder for the images (default .): CUSTOM_ID-SEED.FORMAT")
        parser.add_argument("--poll-s", type=positive_float, default=1.0, metavar="SECONDS",
                            help="how often the batch is read while waiting (default 1)")

    submit = add("submit", run_submit, "upload a JSONL file and create a batch of its requests")
    submit.add_argument("file", type=Path, metavar="FILE.jsonl",
                        help='one request a line: {"custom_id", "method": "POST", "url", "body"}')
    submit.add_argument("--endpoint", choices=ENDPOINTS, default=ENDPOINTS[0],
                        help="the url every line names (default /v1/images/generations)")
    submit.add_argument("--wait", action="store_true", help="follow the batch until it ends, then save its images")
    add_waiting_options(submit)
    add("show", run_show, "a batch's status, counts, errors and files").add_argument("batch_id", metavar="ID")
    add("cancel", run_cancel, "cancel a batch: queued lines never run, running ones finish").add_argument(
        "batch_id", metavar="ID")
    wait = add("wait", run_wait, "follow a batch until it ends, then save its images")
    wait.add_argument("batch_id", metavar="ID")
    add_waiting_options(wait)


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return value


def run_submit(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    uploaded = upload_batch_file(server, args.file)
    batch = create_batch(server, uploaded["id"], args.endpoint)
    if args.wait:
        return follow(server, batch["id"], args, output)
    return report_submitted(batch, BATCH, output)


def run_show(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    batch = get_batch(server, args.batch_id)
    return report_status(batch, describe_batch(batch), output)


def describe_batch(batch: dict[str, Any]) -> list[str]:
    lines = [f"{batch['id']}: {progress_words(batch)} ({batch['endpoint']})"]
    lines += validation_errors(batch)
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name):
            lines.append(f"{name.removesuffix('_id').replace('_', ' ')}: {batch[name]}")
    if batch["status"] in FINAL_STATUSES and batch.get("output_file_id"):
        lines.append(f"save its images with `diffuser-api batch wait {batch['id']}`")
    return lines


def validation_errors(batch: dict[str, Any]) -> list[str]:
    """A batch whose file was refused lists why, line by line (1-based, as an editor counts)."""
    errors = (batch.get("errors") or {}).get("data") or []
    return [f"line {error.get('line')}: {error.get('message')}"
            + (f" (param {error['param']})" if error.get("param") else "") for error in errors]


def run_cancel(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    batch = cancel_batch(server, args.batch_id)
    return report_status(batch, [f"batch {batch['id']}: cancel asked, now {batch['status']}"], output)


def run_wait(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    return follow(server, args.batch_id, args, output)


def follow(server: Server, batch_id: str, args: argparse.Namespace, output: Output) -> dict[str, Any]:
    """Poll until the batch ends, save what completed, then report what did not."""
    with stop_watching_on_ctrl_c(batch_id, BATCH), batch_display(output.mode, output.stdout, batch_id) as display:
        batch = poll_until_final(server, batch_id, args.poll_s, display)
        saved = save_output(server, batch, args.output_dir, display)
        failed = failed_lines(server, batch)
    total, completed, failed_count = counts_of(batch)
    result = {"batch": batch["id"], "status": batch["status"],
              "request_counts": {"total": total, "completed": completed, "failed": failed_count},
              "images": [image.as_json() for image in saved], "failed": failed,
              "errors": (batch.get("errors") or {}).get("data") or []}
    problems = validation_errors(batch) + [failure_words(line) for line in failed]
    # A batch cancelled once every line had run has lost nothing: only lines that did not
    # complete (and a refused file) make it a failure.
    if problems or batch["status"] == "failed":
        raise SomeLinesFailed(result, problems or [f"batch {batch['id']} failed"])
    return result


def poll_until_final(server: Server, batch_id: str, poll_s: float, display: BatchDisplay) -> dict[str, Any]:
    while True:
        batch = get_batch(server, batch_id)
        display.update(batch)
        if batch["status"] in FINAL_STATUSES:
            return batch
        time.sleep(poll_s)


def output_lines(server: Server, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [json.loads(line) for line in file_content(server, file_id).decode().splitlines() if line.strip()]


def save_output(server: Server, batch: dict[str, Any], directory: Path, display: BatchDisplay) -> list[SavedImage]:
    saved = []
    for line in output_lines(server, batch.get("output_file_id")):
        body = line["response"]["body"]
        prefix = file_prefix(line["custom_id"])
        for item in body.get("data", []):
            image = save_image(image_b64(server, item), item["seed"], directory, prefix,
                               body.get("output_format", "png"), revised_prompt=item.get("revised_prompt"))
            saved.append(image)
            display.saved(image)
    return saved


def file_prefix(custom_id: str) -> str:
    """A custom_id may hold ``/`` or ``..``: a file name must not leave the output folder."""
    return UNSAFE_IN_NAMES.sub("_", custom_id) or "line"


def failed_lines(server: Server, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The error file's lines: refused or failed requests (the server's envelope) and lines a
    cancelled or expired batch never ran (an ``error`` with OpenAI's code)."""
    failed = []
    for line in output_lines(server, batch.get("error_file_id")):
        response = line.get("response") or {}
        error = line.get("error") or (response.get("body") or {}).get("error") or {}
        failed.append({"custom_id": line.get("custom_id"), "status_code": response.get("status_code"),
                       "message": error.get("message"), "param": error.get("param"), "code": error.get("code")})
    return failed


def failure_words(line: dict[str, Any]) -> str:
    details = [f"param {line['param']}" if line.get("param") else None,
               f"HTTP {line['status_code']}" if line.get("status_code") else None, line.get("code")]
    known = ", ".join(detail for detail in details if detail)
    return f"failed {line['custom_id']}: {line['message']}" + (f" ({known})" if known else "")
