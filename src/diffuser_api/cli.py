"""``diffuser-api serve``: start the server; flags override ``DIFFUSER_*`` settings.

The other subcommands (``generate``, ``edit``, ``vary``, ``models``) are the client, in
``diffuser_api.client``: they talk to a running server and import nothing of it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError
from uvicorn.server import STARTUP_FAILURE

from diffuser_api.client.commands import add_client_commands, run_client_command
from diffuser_api.config import Settings
from diffuser_api.log_format import configure_logging

if TYPE_CHECKING:
    from fastapi import FastAPI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="diffuser-api", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI Images API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model-id", help="hub id, local folder or tiny-sd")
    serve.add_argument("--device", help="auto, cpu, cuda, or a list such as cuda:0,cuda:1")
    serve.add_argument("--torch-dtype", choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--cache-dir")
    serve.add_argument("--storage-dir")
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--max-queue-size", type=int)
    serve.add_argument("--log-level")
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve: one deployment per model")
    serve.add_argument("--ray-address", help="join this Ray cluster (with --ray) instead of starting one")
    commands.add_parser("ray-config", help="write the Ray Serve config of the current settings (YAML) to stdout")
    add_client_commands(commands)
    return parser.parse_args(argv)


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How ``serve`` runs uvicorn; tests serve on a free port with the same options (``overrides``)."""
    from diffuser_api.serving import connections_deadline_s  # the server's parts: not for client commands

    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # uvicorn's loggers go through ours (format, key scrubbing); our access line replaces its own.
        log_config=None,
        access_log=False,
        # A backstop: the models are drained to finish within the grace (serving.DrainingServer).
        timeout_graceful_shutdown=connections_deadline_s(settings.shutdown_grace_s),
        # A WebSocket edit carries its images in one JSON message, as large as an edits body may
        # be; uvicorn's own 16 MiB default would otherwise override the setting. Its other
        # limits do not undercut ours: h11 caps only headers (16 KiB) and streams bodies, and
        # limit_concurrency stays off so max_connections answers 503 in the OpenAI envelope.
        ws_max_size=settings.max_edit_bytes,
        # X-Forwarded-* are resolved by the app under settings.trusted_proxies (api/proxies.py).
        # uvicorn's own handling would rewrite the client address first (trusting 127.0.0.1 by
        # default, whatever the setting), and the app could no longer tell a proxy from a client.
        proxy_headers=False,
        forwarded_allow_ips="",
    )
    return uvicorn.Config(app, **(options | overrides))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "ray-config":
        sys.exit(write_ray_config())
    if args.command != "serve":
        sys.exit(run_client_command(args))
    overrides = {key: value for key, value in vars(args).items()
                 if key not in ("command", "ray", "ray_address") and value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:  # the settings' own words (never their values), not a traceback
        sys.exit(f"diffuser-api: invalid settings: {error}")
    configure_logging(settings.log_level, settings.log_format)
    if args.ray or args.ray_address:
        from diffuser_api.ray_serve.launch import serve_on_ray
        from diffuser_api.ray_serve.serve_config import settings_env

        serve_on_ray(settings, settings_env(os.environ, overrides), args.ray_address)
        return
    from diffuser_api.main import build_app
    from diffuser_api.serving import DrainingServer

    app = build_app(settings)
    config = uvicorn_config(app, settings)
    server = DrainingServer(config, app.state.registry, settings.shutdown_grace_s)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def write_ray_config() -> int:
    """The Serve config for ``serve run`` / ``serve deploy`` / a RayService, from the settings."""
    import yaml

    from diffuser_api.ray_serve.serve_config import serve_config, settings_env

    sys.stdout.write(yaml.safe_dump(serve_config(Settings(), settings_env(os.environ)), sort_keys=False))
    return 0


if __name__ == "__main__":
    main()
