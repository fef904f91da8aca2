"""The models file's ``ray:`` section, ``diffuser-api ray-config`` (checked with Ray Serve's own
config schema) and the KubeRay RayService that carries the same config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffuser_api.cli import main
from diffuser_api.config import Settings
from diffuser_api.config.models_file import ModelsFileError, parse_models_file, plan_from_file
from diffuser_api.ray_serve.serve_config import INGRESS_NAME, serve_config, settings_env

RAYSERVICE = Path(__file__).parents[2] / "deploy" / "kuberay" / "rayservice.yaml"
TWO_MODELS = """\
models:
  - id: tiny
    source: tiny-sd
  - id: org/big
    engine: {max_batch_size: 4}
    ray:
      autoscaling_config: {min_replicas: 0, max_replicas: 3, target_ongoing_requests: 6}
      ray_actor_options: {num_gpus: 0.5, num_cpus: 0.5, memory: 2GiB}
      max_queued_requests: 32
"""


def plan_of(text: str, **settings):
    return plan_from_file(parse_models_file(text), Settings(_env_file=None, **settings))


def test_ray_defaults_let_two_full_batches_in_and_autoscaling_is_passed_through():
    tiny, big = plan_of(TWO_MODELS, max_batch_size=8).models
    assert tiny.ray.deployment_options() == {
        "num_replicas": 1, "max_ongoing_requests": 16, "max_queued_requests": -1, "ray_actor_options": {"num_gpus": 0},
    }
    assert big.ray.deployment_options() == {
        "max_ongoing_requests": 8, "max_queued_requests": 32,
        "ray_actor_options": {"num_gpus": 0.5, "num_cpus": 0.5, "memory": 2 * 2**30},
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 6},
    }


@pytest.mark.parametrize(
    ("ray", "expected"),
    [
        ("{max_ongoing_requests: 5}", "ray.max_ongoing_requests (5) must be at least 16"),
        ("{num_replicas: 2, autoscaling_config: {max_replicas: 2}}", "set ray.num_replicas or ray.autoscaling_config"),
        ("{autoscaling_config: {min_replicas: 3, max_replicas: 2}}", "max_replicas (2) is below min_replicas (3)"),
        ("{num_replicas: 0}", "line 3: 'models[0].ray.num_replicas': Input should be greater than 0"),
        ("{replicas: 2}", "line 3: unknown key 'models[0].ray.replicas'; allowed here: num_replicas"),
        ("{ray_actor_options: {num_gpus: -1}}", "'models[0].ray.ray_actor_options.num_gpus'"),
    ],
)
def test_a_bad_ray_section_is_refused_saying_why(ray, expected):
    with pytest.raises(ModelsFileError) as caught:
        plan_of(f"models:\n  - id: a\n    ray: {ray}\n", max_batch_size=8)
    assert expected in str(caught.value)


def test_ray_config_writes_a_serve_config_that_ray_serve_accepts(tmp_path, monkeypatch, capsys):
    schema = pytest.importorskip("ray.serve.schema")
    models = tmp_path / "models.yaml"
    models.write_text(TWO_MODELS)
    monkeypatch.setenv("DIFFUSER_MODELS_FILE", str(models))
    monkeypatch.setenv("DIFFUSER_PORT", "9000")
    monkeypatch.setenv("DIFFUSER_API_KEYS", "sk-secret-one")
    with pytest.raises(SystemExit) as exited:
        main(["ray-config"])
    assert exited.value.code == 0
    written = yaml.safe_load(capsys.readouterr().out)
    parsed = schema.ServeDeploySchema.model_validate(written)
    (application,) = parsed.applications
    assert (application.name, application.route_prefix) == ("diffuser-api", "/")
    assert application.import_path == "diffuser_api.ray_serve.application:build_application"
    assert [deployment.name for deployment in application.deployments] == [INGRESS_NAME, "model-tiny", "model-org-big"]
    assert parsed.http_options.port == 9000
    env = application.runtime_env["env_vars"]
    assert env["DIFFUSER_MODELS_FILE"] == str(models) and "DIFFUSER_API_KEYS" not in env
    assert "sk-secret-one" not in yaml.safe_dump(written)


def kuberay_documents() -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all(RAYSERVICE.read_text())}


def test_the_rayservice_carries_what_ray_config_writes_for_its_models_file(tmp_path):
    documents = kuberay_documents()
    models = tmp_path / "models.yaml"
    models.write_text(documents["ConfigMap"]["data"]["models.yaml"])
    env = {
        "DIFFUSER_MODELS_FILE": "/etc/diffuser/models.yaml", "DIFFUSER_HOST": "0.0.0.0", "DIFFUSER_PORT": "8000",
        "DIFFUSER_CACHE_DIR": "/models", "DIFFUSER_API_KEYS_FILE": "/etc/diffuser-keys/keys.yaml",
        "DIFFUSER_RATE_LIMIT_STORAGE_URI": "redis://redis:6379",
        "DIFFUSER_STORAGE_URL": "s3://diffuser-images/generated",
    }
    settings = Settings(_env_file=None, models_file=models, host="0.0.0.0", port=8000)
    carried = yaml.safe_load(documents["RayService"]["spec"]["serveConfigV2"])
    assert carried == serve_config(settings, settings_env(env))
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(carried)


def test_the_rayservice_has_the_keys_kuberay_needs_and_an_autoscaling_gpu_group():
    service = kuberay_documents()["RayService"]
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 8000 in [port["containerPort"] for port in head["ports"]]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"] and gpu["groupName"] and "rayStartParams" in gpu
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1 and limits["memory"] == "32Gi"


def test_the_models_configmap_is_a_valid_kubernetes_object():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(kuberay_documents()["ConfigMap"], "1.30.0", strict=True)
