"""The client's subcommands: ``generate``, ``edit``, ``vary``, ``models`` (``jobs`` in jobs.py,
``batch`` in batches.py).

Generations and edits go over the WebSocket for live progress; variations have no WebSocket
route, so they are one HTTP request behind a spinner. With ``--async`` each is submitted as a
job over HTTP (``Prefer: respond-async``) and the command exits with its id.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from diffuser_api.client.batches import add_batch_command
from diffuser_api.client.failures import (
    ConnectionFailed,
    ExitCode,
    ServerRefused,
    SomeLinesFailed,
    StoppedWatching,
)
from diffuser_api.client.http import create_variation, list_models, submit_json_job, submit_variation_job
from diffuser_api.client.jobs import add_jobs_command
from diffuser_api.client.output import EXIT_CODES_HELP, Output
from diffuser_api.client.saving import FORMATS, SavedImage, save_image
from diffuser_api.client.server import Server, resolve_server
from diffuser_api.client.socket import run_session
from diffuser_api.client.watching import JOB, report_submitted


def add_client_commands(commands: Any) -> None:
    """Add the client's subcommands to ``diffuser-api``'s subparsers (next to ``serve``)."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--server", help="server URL (default: $DIFFUSER_API_URL, $OPENAI_BASE_URL, "
                                             "or http://127.0.0.1:8000)")
    connection.add_argument("--api-key", help="API key (default: $OPENAI_API_KEY)")
    modes = connection.add_mutually_exclusive_group()
    modes.add_argument("-q", "--quiet", action="store_true", help="print only the saved files' paths")
    modes.add_argument("--json", action="store_true", help="print one JSON object: files, seeds, response fields")

    image = argparse.ArgumentParser(add_help=False)
    image.add_argument("--model", help="model id (default: the server's default model)")
    image.add_argument("-n", type=positive_int, help="number of images")
    image.add_argument("--size", help="WxH, e.g. 512x512")
    image.add_argument("--steps", type=positive_int, help="denoising steps (num_inference_steps)")
    image.add_argument("--seed", type=int, help="seed of the first image; the others take the next seeds")
    image.add_argument("--guidance", type=float, help="guidance scale")
    image.add_argument("--negative-prompt")
    image.add_argument("--format", choices=FORMATS, default="png", help="image format of the files (default png)")
    image.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="folder for the images (default .)")
    image.add_argument("--prefix", help="file name prefix (default: the command's name): PREFIX-SEED.FORMAT")
    image.add_argument("--loras", type=lora_list, metavar="NAME[:SCALE],...",
                       help="LoRA adapters the model has registered, each with an optional scale")
    image.add_argument("--async", dest="run_async", action="store_true",
                       help="submit an async job, print its id and exit (then: diffuser-api jobs wait ID)")

    def add(name: str, run: Callable[..., Any], parents: list[argparse.ArgumentParser], help: str) -> Any:
        parser = commands.add_parser(name, parents=parents, help=help, description=help, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(run=run)
        return parser

    generate = add("generate", run_generate, [connection, image], "make images from a prompt, with live progress")
    generate.add_argument("prompt")
    edit = add("edit", run_edit, [connection, image], "edit one or several images, optionally within a mask")
    edit.add_argument("images", nargs="+", type=readable_file, metavar="IMAGE")
    edit.add_argument("--prompt", required=True)
    edit.add_argument("--mask", type=readable_file, help="PNG whose transparent pixels mark what to edit")
    vary = add("vary", run_vary, [connection, image], "make variations of an image")
    vary.add_argument("image", type=readable_file)
    add("models", run_models, [connection], "list the server's models and their status")
    add_jobs_command(commands, connection)
    add_batch_command(commands, connection)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def lora_list(text: str) -> list[dict[str, Any]]:
    """``pixel-art:0.6,film-grain`` -> the API's ``loras``; a scale left out is the adapter's default."""
    loras = []
    for entry in text.split(","):
        name, _, scale = entry.strip().partition(":")
        if not name:
            raise argparse.ArgumentTypeError(f"each LoRA needs a name (NAME[:SCALE],...), not {text!r}")
        try:
            loras.append({"name": name} | ({"scale": float(scale)} if scale else {}))
        except ValueError:
            raise argparse.ArgumentTypeError(f"the scale of LoRA {name!r} must be a number, not {scale!r}") from None
    return loras


def readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def run_client_command(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one parsed client command; the exit code tells scripts what went wrong."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    output = Output.for_args(args, stdout)
    try:
        server = resolve_server(args.server, args.api_key)
    except ValueError as error:
        print(f"error: {error}", file=stderr)
        return ExitCode.USAGE
    try:
        result = args.run(args, server, output)
    except ServerRefused as refusal:
        if output.mode == "json":
            print(json.dumps(refusal.envelope()), file=stdout)
        print("\n".join(refusal.describe()), file=stderr)
        return refusal.exit_code
    except ConnectionFailed as error:
        if output.mode == "json":
            print(json.dumps({"error": {"message": str(error), "type": "connection_error"}}), file=stdout)
        print(f"error: {error}", file=stderr)
        return ExitCode.CONNECTION
    except OSError as error:  # reading an input image or writing an output image
        print(f"error: {error.strerror or error}: {error.filename}", file=stderr)
        return ExitCode.FILE_ERROR
    except StoppedWatching as stopped:
        print(stopped.describe(), file=stderr)
        return ExitCode.INTERRUPTED
    except SomeLinesFailed as failed:
        if output.mode == "json":
            print(json.dumps(failed.result), file=stdout)
        print("\n".join(failed.problems), file=stderr)
        return ExitCode.CLIENT_ERROR
    except KeyboardInterrupt:
        print("cancelled", file=stderr)
        return ExitCode.INTERRUPTED
    if output.mode == "json":
        print(json.dumps(result), file=stdout)
    return ExitCode.OK


def image_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The options every image command shares, in the API's names; unset ones are left to the server."""
    fields = {"model": args.model, "n": args.n, "size": args.size, "num_inference_steps": args.steps,
              "seed": args.seed, "guidance_scale": args.guidance, "negative_prompt": args.negative_prompt,
              "loras": args.loras}
    return {name: value for name, value in fields.items() if value is not None}


def generation_body(args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": args.prompt, "output_format": args.format} | image_fields(args)


def edit_body(args: argparse.Namespace) -> dict[str, Any]:
    """Edits go as JSON, images as data URLs (as OpenAI's JSON edits do), on the WebSocket and
    to the HTTP route (jobs); the WebSocket also reads ``endpoint``."""
    body = {"endpoint": "edits", "prompt": args.prompt, "output_format": args.format,
            "images": [{"image_url": data_url(path)} for path in args.images]}
    if args.mask is not None:
        body["mask"] = {"image_url": data_url(args.mask)}
    return body | image_fields(args)


def data_url(path: Path) -> str:
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def run_generate(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    if args.run_async:
        return report_submitted(submit_json_job(server, "generations", generation_body(args)), JOB, output)
    return _over_websocket(args, server, output, generation_body(args), _doing("generating", args.n))


def run_edit(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    if args.run_async:
        body = {name: value for name, value in edit_body(args).items() if name != "endpoint"}
        return report_submitted(submit_json_job(server, "edits", body), JOB, output)
    return _over_websocket(args, server, output, edit_body(args), _doing("editing", args.n))


def _over_websocket(
    args: argparse.Namespace, server: Server, output: Output, body: dict[str, Any], what: str
) -> dict[str, Any]:
    """Each image is written as it arrives, so a later failure or Ctrl-C keeps the finished ones."""
    saved: list[SavedImage] = []
    with output.display(what) as display:

        def on_message(message: dict[str, Any]) -> None:
            if message.get("type") != "completed":
                display.event(message)
                return
            image = save_image(message["b64_json"], message["seed"], args.output_dir, _prefix(args), args.format,
                               revised_prompt=message.get("revised_prompt"))
            saved.append(image)
            display.saved(image)

        run_session(server, body, on_message)
    return {"images": [image.as_json() for image in saved], "output_format": args.format}


def run_vary(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    fields = image_fields(args) | {"response_format": "b64_json"}
    if args.run_async:
        return report_submitted(submit_variation_job(server, args.image, fields), JOB, output)
    what = _doing("making variations", args.n)
    with output.display(what) as display:
        display.waiting(what)
        response = create_variation(server, args.image, fields)
        # Variations take no output_format: the server sends its format and --format is applied here.
        received = response.get("output_format", "png")
        saved = [
            save_image(item["b64_json"], item["seed"], args.output_dir, _prefix(args), args.format,
                       received_format=received, revised_prompt=item.get("revised_prompt"))
            for item in response.get("data", [])
        ]
        for image in saved:
            display.saved(image)
    answer = {name: value for name, value in response.items() if name != "data"}
    return answer | {"images": [image.as_json() for image in saved], "output_format": args.format}


def run_models(args: argparse.Namespace, server: Server, output: Output) -> dict[str, Any]:
    response = list_models(server)
    models = [model for model in response.get("data", []) if isinstance(model, dict)]
    if output.mode == "paths":
        for model in models:
            print(model.get("id"), file=output.stdout)
    elif output.mode == "live":
        table = Table("model", "status", "owned by")
        for model in models:
            table.add_row(str(model.get("id")), str(model.get("status", "")), str(model.get("owned_by", "")))
        Console(file=output.stdout).print(table)
    elif output.mode == "lines":
        for model in models:
            print(f"{model.get('id')}\t{model.get('status', '')}", file=output.stdout)
    return response


def _doing(what: str, n: int | None) -> str:
    return f"{what} ({n} images)" if n and n > 1 else what


def _prefix(args: argparse.Namespace) -> str:
    return args.prefix or args.command
