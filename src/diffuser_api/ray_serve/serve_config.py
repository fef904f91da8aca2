"""The Serve config (``serve run`` / ``serve deploy`` / KubeRay's ``serveConfigV2``) for the
current settings and models file: what ``diffuser-api ray-config`` writes and what
``diffuser-api serve --ray`` deploys, so both roads run the same application.

Settings travel as the application's ``runtime_env`` environment variables (``DIFFUSER_*``),
read by the builder and every replica; secrets (API keys) are never written into the file:
give them to the nodes themselves (a Kubernetes Secret, or ``DIFFUSER_API_KEYS_FILE``).
Imports no Ray.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from diffuser_api.config import Settings
from diffuser_api.config.models_file import serving_plan

APP_NAME = "diffuser-api"
IMPORT_PATH = "diffuser_api.ray_serve.application:build_application"
INGRESS_NAME = "DiffuserIngress"
# The ingress parses HTTP, decodes and encodes images: a small share of a CPU, and as many
# requests at once as the server takes connections (Ray's default of 5 would cap them).
INGRESS_NUM_CPUS = 0.25
ENV_PREFIX = "DIFFUSER_"
SECRET_SETTINGS = frozenset(
    name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)
)


def deployment_name(model_id: str) -> str:
    """A Ray deployment name for a model id (hub ids have slashes)."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_id)


def settings_env(environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``DIFFUSER_*`` variables of ``environ`` with ``overrides`` (settings by field name,
    as ``serve``'s flags give them) on top, secrets left out."""
    secret = {ENV_PREFIX + name.upper() for name in SECRET_SETTINGS}
    env = {key: value for key, value in environ.items() if key.startswith(ENV_PREFIX) and key not in secret}
    for name, value in (overrides or {}).items():
        env[ENV_PREFIX + name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
    return dict(sorted(env.items()))


def serve_config(settings: Settings, env: Mapping[str, str]) -> dict[str, Any]:
    """A ``ServeDeploySchema`` as plain data: one application, an ingress and one deployment
    per model with the ``ray:`` options of its entry. ``env`` is ``settings_env``'s result."""
    plan = serving_plan(settings)
    names = [deployment_name(spec.id) for spec in plan.models]
    if len(set(names)) < len(names) or INGRESS_NAME in names:
        raise ValueError(f"model ids give clashing Ray deployment names: {', '.join(names)}")
    deployments = [
        {"name": INGRESS_NAME, "num_replicas": 1, "max_ongoing_requests": settings.max_connections,
         "ray_actor_options": {"num_cpus": INGRESS_NUM_CPUS}},
        *({"name": name, **spec.ray.deployment_options()} for name, spec in zip(names, plan.models, strict=True)),
    ]
    application: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "runtime_env": {"env_vars": dict(env)},
        "deployments": deployments,
    }
    return {"http_options": {"host": settings.host, "port": settings.port}, "applications": [application]}
