"""``diffuser-api jobs list|show|cancel|wait``: the async jobs ``--async`` submits.

``wait`` follows the job's events (queue position, steps) with the same display as
``generate`` and saves its images the same way. Leaving it (Ctrl-C) only stops watching: a
job does not depend on a connection, so it keeps running and ``wait`` can resume it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffuser_api.client.events import follow_job
from diffuser_api.client.failures import ServerRefused, refusal_from
from diffuser_api.client.http import cancel_job, get_job, image_b64, list_jobs
from diffuser_api.client.output import EXIT_CODES_HELP, Output
from diffuser_api.client.progress import Display
from diffuser_api.client.saving import FORMATS, SavedImage, save_image
from diffuser_api.client.server import Server
from diffuser_api.client.watching import JOB, action_adder, report_status, stop_watching_on_ctrl_c

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled", "expired")
# A job's images are named like those of the command that would have made them at once.
COMMAND_OF_ENDPOINT = {"generations": "generate", "edits": "edit", "variations": "vary"}


def add_jobs_command(commands: Any, connection: argparse.ArgumentParser) -> None:
    jobs = commands.add_parser("jobs", help="list, show, cancel or wait for async jobs (see --async)",
                               description="Async jobs: submitted with --async, they run without a connection.")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="{list,show,cancel,wait}")
    add = action_adder(actions, connection, EXIT_CODES_HELP)

    listing = add("list", run_list, "your jobs, newest first")
    listing.add_argument("--status", choices=STATUSES, help="only the jobs in this status")
    listing.add_argument("--limit", type=int, default=20, help="how many (1-100, default 20)")
    listing.add_argument("--after", metavar="ID", help="the jobs after this one (the next page)")
    add("show", run_show, "a job's status, progress and outcome").add_argument("job_id", metavar="ID")
    add("cancel", run_cancel, "cancel a job: a queued one never runs, a running one stops").add_argument(
        "job_id", metavar="ID")
    wait = add("wait", run_wait, "follow a job with live progress until it ends, then save its images")
    wait.add_argument("job_id", metavar="ID")
    wait.add_argument("--format", choices=FORMATS, help="re-encode the images (default: as the server made them)")
    wait.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="folder for the images (default .)")
    wait.add_argument("--prefix", help="file name prefix (default: the command that makes such images, "
                                       "e.g. generate): PREFIX-SEED.FORMAT")


def run_list(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    response = list_jobs(server, {"status": args.status, "limit": args.limit, "after": args.after})
    for job in response.get("data", []):
        if output.mode == "paths":
            print(job["id"], file=output.stdout)
        else:
            output.line(f"{job['id']}\t{job['status']}\t{job['endpoint']}\t{job['model']}\t{job['progress']}%")
    return response


def run_show(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    job = get_job(server, args.job_id)
    return report_status(job, describe_job(job), output)


def describe_job(job: dict[str, Any]) -> list[str]:
    lines = [f"{job['id']}: {job['status']} ({job['endpoint']}, model {job['model']})",
             f"progress: {job['progress']}%"]
    if job.get("queue_position") is not None:
        lines.append(f"queue position: {job['queue_position']}")
    if job.get("attempts"):
        lines.append(f"attempts: {job['attempts']}")
    if job.get("error"):
        lines.append(f"error: {job['error'].get('message')}")
    if job.get("result"):
        seeds = ", ".join(str(image.get("seed")) for image in job["result"].get("data", []))
        lines.append(f"images: {len(job['result'].get('data', []))} (seeds {seeds}); "
                     f"save them with `diffuser-api jobs wait {job['id']}`")
    return lines


def run_cancel(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    job = cancel_job(server, args.job_id)
    return report_status(job, [f"job {job['id']}: cancel asked, now {job['status']}"], output)


def run_wait(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    with stop_watching_on_ctrl_c(args.job_id, JOB), output.display(f"job {args.job_id}") as display:
        display.waiting(f"job {args.job_id}")
        received: dict[int, str] = {}
        job = follow_job(server, args.job_id, lambda event: _take(event, display, received))
        if job["status"] != "completed":
            raise job_refusal(job)
        output_format, saved = save_job_images(job, server, args, received)
        for image in saved:
            display.saved(image)
    return {"job": job["id"], "status": job["status"], "images": [image.as_json() for image in saved],
            "output_format": output_format}


def _take(event: dict[str, Any], display: Display, received: dict[int, str]) -> None:
    """Each image as its ``…completed`` event brings it (the final job names it by url only);
    progress to the display."""
    if str(event.get("type", "")).endswith(".completed") and event.get("b64_json"):
        received[int(event.get("image_index") or 0)] = event["b64_json"]
    else:
        _show(event, display)


def _show(event: dict[str, Any], display: Display) -> None:
    """Job events in the display's words (those of the WebSocket's messages)."""
    if event.get("type") != "image.job.progress":
        return  # previews
    if event.get("status") == "queued":
        display.event({"type": "queued", "position": event.get("queue_position")})
    elif event.get("step") is not None and event.get("total_steps"):
        display.event({"type": "progress", "step": event["step"], "total_steps": event["total_steps"]})
    elif event.get("status") == "in_progress":
        display.event({"type": "running"})


def job_refusal(job: dict[str, Any]) -> ServerRefused:
    """A failed or cancelled job ends the command as its error would have ended a request."""
    if isinstance(job.get("error"), dict):
        return refusal_from({"error": job["error"]}, None)
    return ServerRefused(f"job {job['id']} ended {job['status']}", type="server_error")


def save_job_images(job: dict[str, Any], server: Server, args: argparse.Namespace,
                    in_hand: Mapping[int, str]) -> tuple[str, list[SavedImage]]:
    """``in_hand``: images already received, base64 by index (the stream's); others are downloaded."""
    result = job["result"]
    received = result.get("output_format", "png")
    output_format = args.format or received
    prefix = args.prefix or COMMAND_OF_ENDPOINT.get(job["endpoint"], "job")
    saved = []
    for index, item in enumerate(result.get("data", [])):
        b64 = in_hand.get(index) or image_b64(server, item)
        saved.append(save_image(b64, item["seed"], args.output_dir, prefix, output_format,
                                received_format=received, revised_prompt=item.get("revised_prompt")))
    return output_format, saved
