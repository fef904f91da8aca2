"""Wires settings -> serving plan -> registry (with the diffusers probe and loader) -> app.
The only place that does."""

from __future__ import annotations

from fastapi import FastAPI

from diffuser_api.api.app import create_app
from diffuser_api.config import Settings
from diffuser_api.config.models_file import serving_plan
from diffuser_api.log_format import route_library_logs
from diffuser_api.models.registry import LoadedRunners, ModelRegistry, ProbedModel, warm_up
from diffuser_api.models.spec import ModelSpec, ServingPlan


def build_registry(settings: Settings, plan: ServingPlan | None = None) -> ModelRegistry:
    """Every model of the plan (by default the settings'), probed now (configs only); weights
    load when the registry says."""
    route_library_logs()
    # Imported here so that building an app with another registry (tests) never loads torch.
    from diffuser_api.models.checkpoint import probe_model
    from diffuser_api.models.cpu_threads import CpuThreads
    from diffuser_api.models.loading import DiffusersModel, load_model, resolve_devices
    from diffuser_api.models.memory import check_memory_options

    plan = plan or serving_plan(settings)
    for spec in plan.models:  # an option this machine cannot run stops the start, naming it
        check_memory_options(spec, resolve_devices(spec.devices))

    probed: dict[str, ProbedModel] = {}
    cpu_threads = CpuThreads.of_this_process()

    def probe(spec: ModelSpec) -> ProbedModel:
        probed[spec.id] = probe_model(spec, settings)
        return probed[spec.id]

    def loader(spec: ModelSpec) -> DiffusersModel:
        """Load, then warm up before the registry measures the working memory."""
        loaded = load_model(spec, settings, cpu_threads)
        if spec.warmup:
            warm_up(LoadedRunners(probed[spec.id].capabilities, loaded.runners, loaded.pipeline_class),
                    sizes=2 if spec.speed.compile else 1)
        return loaded

    return ModelRegistry(plan, probe=probe, loader=loader, strict_names=settings.strict_model_names)


def build_app(settings: Settings) -> FastAPI:
    from diffuser_api.models.device_memory import cuda_memory

    return create_app(settings, build_registry(settings), device_memory=cuda_memory)
