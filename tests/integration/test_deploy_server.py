"""``diffuser-api serve`` with the settings deploy/ gives it, as the container and the pod run it:
the image's HEALTHCHECK, kubelet's probe, the openai SDK, and SIGTERM within the pod's grace.
(No Docker daemon or cluster here: the process is the one the image's ENTRYPOINT starts.)"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import httpx
import openai
import pytest
import yaml

from tests.conftest import LiveServer
from tests.unit.test_deploy_files import POD_HOST, container, container_env, healthcheck_command, image_env, pod_spec

pytestmark = pytest.mark.slow

KEY = "sk-deploy-live-0123456789"


def test_the_deployed_server_answers_its_probes_serves_and_stops_within_the_grace(tmp_path):
    keys_file = tmp_path / "keys.yaml"  # what the Secret holds: hashes only
    entry = {"name": "deploy", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
    keys_file.write_text(yaml.safe_dump({"keys": [entry]}))
    server = LiveServer(
        tmp_path,
        DIFFUSER_HOST=image_env()["DIFFUSER_HOST"],
        DIFFUSER_SHUTDOWN_GRACE_S=container_env()["DIFFUSER_SHUTDOWN_GRACE_S"],
        DIFFUSER_API_KEYS_FILE=str(keys_file),
    )
    try:
        server.wait_ready()
        check = subprocess.run(healthcheck_command(), env=os.environ | {"DIFFUSER_PORT": str(server.port)},
                               capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
        probe = container()["readinessProbe"]["httpGet"]["path"]
        assert httpx.get(server.base_url + probe, headers={"host": POD_HOST}, timeout=5).status_code == 200

        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
        image = client.images.generate(prompt="a fox", size="64x64", extra_body={"num_inference_steps": 2})
        assert image.data[0].b64_json

        sleep = float(container()["lifecycle"]["preStop"]["exec"]["command"][1])
        window = pod_spec()["terminationGracePeriodSeconds"] - sleep  # what is left after preStop
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown is over.
        assert server.process.wait(window) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < window
        assert "Application shutdown complete" in server.log.read_text()
    finally:
        server.stop()
