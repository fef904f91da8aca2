"""``diffuser-api serve --ray``: start (or join) Ray, deploy the Serve config that
``ray-config`` would write, wait until it runs, and serve until told to stop."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve._private.api import _get_global_client
from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

from diffuser_api.config import Settings
from diffuser_api.ray_serve.serve_config import APP_NAME, serve_config

logger = logging.getLogger(__name__)

# How often the application's status is read while it deploys.
DEPLOY_POLL_S = 0.5
# A first deployment may download every model's weights before its replicas run.
DEPLOY_TIMEOUT_S = 3600.0


def deploy(settings: Settings, env: Mapping[str, str], timeout_s: float) -> None:
    """Deploy the application on the connected Ray (Serve started on the settings' host and
    port if it is not yet) and wait until it runs; a failed deployment is a RuntimeError
    naming Ray's reason."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    running = ServeInstanceDetails(**_get_global_client().get_serve_details()).http_options
    if running is not None and running.port != settings.port:
        raise RuntimeError(f"Ray Serve already runs on this cluster with its HTTP port {running.port}; "
                           f"set DIFFUSER_PORT={running.port}, or shut Serve down first (serve shutdown)")
    config = serve_config(settings, env)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        application = serve.status().applications.get(APP_NAME)
        status = str(getattr(application, "status", "")) if application is not None else ""
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            raise RuntimeError(f"the Ray Serve application failed to deploy: {application.message}")
        time.sleep(DEPLOY_POLL_S)
    raise RuntimeError(f"the Ray Serve application was not running after {timeout_s:g} s")


def serve_on_ray(settings: Settings, env: Mapping[str, str], address: str | None, **ray_options: Any) -> None:
    """Blocks until SIGINT or SIGTERM, then deletes the application (its replicas get Ray's
    graceful shutdown) and leaves Ray; a Ray started here stops with it."""
    ray.init(address=address, **ray_options)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        deploy(settings, env, timeout_s=DEPLOY_TIMEOUT_S)
        logger.info("serving on Ray Serve at http://%s:%d", settings.host, settings.port)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        if address is None:
            serve.shutdown()
        ray.shutdown()
