"""The Ray Serve application: ``build_application`` is the ``import_path`` of the Serve config.

The ingress deployment serves the very app ``create_app`` builds for one process (routes,
error envelope, auth, rate limits, metrics), with a registry whose models are the model
deployments (``RayModelRegistry`` over ``RemoteEngine``s). Settings come from the
environment (the config's ``runtime_env``), as in one process.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve._private.api import _get_global_client
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffuser_api.config import Settings
from diffuser_api.config.models_file import serving_plan
from diffuser_api.log_format import configure_logging
from diffuser_api.models.spec import ModelSpec
from diffuser_api.ray_serve.registry import RayModelRegistry, ReplicaCounts
from diffuser_api.ray_serve.remote import RemoteEngine
from diffuser_api.ray_serve.replica import ModelReplica
from diffuser_api.ray_serve.serve_config import APP_NAME, INGRESS_NAME, deployment_name

logger = logging.getLogger(__name__)

_FAILED_DEPLOYMENT = {"UNHEALTHY", "DEPLOY_FAILED"}
_STARTING_REPLICA = {"STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION"}


class DiffuserIngress:
    """The app is built on the replica, once the model handles are there."""

    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        self._handles = models

    def __serve_build_asgi_app__(self) -> ASGIApp:
        settings = Settings()
        configure_logging(settings.log_level, settings.log_format)
        return RayProxiedApp(build_ingress_app(settings, self._handles))


class RayProxiedApp:
    """Ray's proxy gives every request an ``x-request-id`` (the client's, or its own) and adds
    that header to the answer; the app, which takes the same id, would add it a second time."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return

        async def send_once(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                del MutableHeaders(scope=message)["x-request-id"]
            await send(message)

        await self._app(scope, receive, send_once)


def build_ingress_app(settings: Settings, handles: dict[str, DeploymentHandle]) -> FastAPI:
    from diffuser_api.api.app import create_app
    from diffuser_api.models.checkpoint import probe_model  # reads configs; builds a tiny model

    plan = serving_plan(settings)
    names = {spec.id: deployment_name(spec.id) for spec in plan.models}
    registry = RayModelRegistry(
        plan,
        probe=lambda spec: probe_model(spec, settings),
        connect=lambda spec, observers: RemoteEngine(
            handles[spec.id], spec.id, spec.engine.request_timeout_s, observers
        ),
        replica_counts=lambda: replica_counts(names),
        scale=scale_model,
        strict_names=settings.strict_model_names,
    )
    return create_app(settings, registry)


def replica_counts(names: dict[str, str]) -> dict[str, ReplicaCounts]:
    """Model id -> its deployment's replicas, from Ray Serve's controller (blocking)."""
    application = serve.status().applications.get(APP_NAME)
    counts = {}
    for model_id, name in names.items():
        deployment = application.deployments.get(name) if application is not None else None
        if deployment is None:
            counts[model_id] = ReplicaCounts()
            continue
        states = {str(getattr(state, "value", state)): number for state, number in deployment.replica_states.items()}
        counts[model_id] = ReplicaCounts(
            running=states.get("RUNNING", 0),
            starting=sum(states.get(state, 0) for state in _STARTING_REPLICA),
            failed=str(getattr(deployment.status, "value", deployment.status)) in _FAILED_DEPLOYMENT,
        )
    return counts


def scale_model(spec: ModelSpec, up: bool) -> None:
    """Redeploy the application as deployed, with this model's replicas changed: a
    lightweight update that restarts no other replica (blocking).

    Up: the entry's own replicas (at least one). Down: autoscaling from zero, at once when
    idle; a request starts a replica again, as a request loads an unloaded model in one
    process. A RayService (KubeRay) puts its own ``serveConfigV2`` back on its next update.
    """
    client = _get_global_client()
    details = ServeInstanceDetails(**client.get_serve_details())
    configs = [app.deployed_app_config for app in details.applications.values() if app.deployed_app_config]
    ours = next((config for config in configs if config.name == APP_NAME), None)
    if ours is None:
        raise RuntimeError(f"the application '{APP_NAME}' was not deployed from a Serve config")
    name = deployment_name(spec.id)
    options = spec.ray.deployment_options()
    if up:
        scaling = options.get("autoscaling_config")
        if scaling is not None:
            scaling["min_replicas"] = max(1, scaling.get("min_replicas", 1))
    else:
        replicas = options.pop("num_replicas", None) or options.get("autoscaling_config", {}).get("max_replicas", 1)
        options["autoscaling_config"] = {
            **options.get("autoscaling_config", {}), "min_replicas": 0, "max_replicas": max(1, replicas),
            "initial_replicas": 0, "downscale_delay_s": 0.0, "downscale_to_zero_delay_s": 0.0,
        }
    entry = {"name": name, **options}
    updated = copy.deepcopy(ours.model_dump(exclude_unset=True))
    updated["deployments"] = [
        entry if deployment["name"] == name else deployment for deployment in updated.get("deployments", [])
    ]
    others = [config.model_dump(exclude_unset=True) for config in configs if config is not ours]
    client.deploy_apps(ServeDeploySchema(applications=[*others, updated]))
    logger.info("%s: target set to %s", spec.id, "at least one replica" if up else "zero replicas when idle")


def build_application(args: dict[str, Any] | None = None) -> Any:
    """The Serve config's ``import_path``: an ingress and one deployment per model, each with
    the options of its ``ray:`` section (the config file's ``deployments`` may override them)."""
    settings = Settings()
    plan = serving_plan(settings)
    models = {
        spec.id: serve.deployment(ModelReplica, name=deployment_name(spec.id), **spec.ray.deployment_options()).bind(
            spec.id
        )
        for spec in plan.models
    }
    ingress = serve.deployment(serve.ingress()(DiffuserIngress), name=INGRESS_NAME)
    return ingress.bind(models)
