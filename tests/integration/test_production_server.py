"""The real server, configured from DIFFUSER_* variables as operators run it: keys, limits,
JSON logs and metrics, with tiny-sd behind them and the openai SDK in front."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

KEY = "sk-live-0123456789abcdef"


def test_keys_limits_json_logs_and_metrics_on_a_live_server(tmp_path):
    server = LiveServer(
        tmp_path,
        DIFFUSER_API_KEYS=KEY,
        DIFFUSER_RATE_LIMIT_IMAGES="3/minute",
        DIFFUSER_LOG_FORMAT="json",
        DIFFUSER_METRICS_PUBLIC="true",
    )
    try:
        server.wait_ready()
        wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.images.generate(prompt="x", size="64x64")
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)
        raw = client.images.with_raw_response.generate(
            prompt="a fox", size="64x64", n=2, extra_body={"num_inference_steps": 2},
            extra_headers={"x-request-id": "live-1"},
        )
        assert raw.headers["x-ratelimit-remaining-images"] == "1"
        with pytest.raises(openai.RateLimitError):
            client.images.generate(prompt="a fox", size="64x64", n=2, extra_body={"num_inference_steps": 2})
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        assert 'diffuser_images_generated_total{model="tiny-sd"} 2.0' in metrics
        assert 'diffuser_model_load_seconds{model="tiny-sd"}' in metrics
    finally:
        server.stop()
    lines = server.log.read_text().splitlines()
    # Every line is ours: uvicorn's, transformers' and diffusers' go through our JSON formatter
    # too, with no loading progress bars, and the libraries' known start-up noise is dropped.
    assert [line for line in lines if not line.startswith("{")] == []
    entries = [json.loads(line) for line in lines]
    assert {"uvicorn.error", "diffuser_api.access"} <= {entry["logger"] for entry in entries}
    assert [entry for entry in entries if entry["level"] not in ("debug", "info")] == []
    (generation,) = [entry for entry in entries if entry.get("request_id") == "live-1"]
    assert generation["status"] == 200
    assert generation["key_name"] == f"key-{hashlib.sha256(KEY.encode()).hexdigest()[:8]}"
    assert (generation["model"], generation["images"], generation["steps"]) == ("tiny-sd", 2, 2)
    assert generation["compute_s"] > 0
    assert KEY not in server.log.read_text()


def test_serve_refuses_a_bad_webhook_secret_naming_the_setting_without_echoing_it(tmp_path):
    """Before loading anything: one line of the settings' own words, no traceback, no secret."""
    key = base64.b64encode(b"only-15-bytes!!").decode()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("DIFFUSER_")}
    result = subprocess.run(
        [sys.executable, "-m", "diffuser_api", "serve"],
        env=environment | {
            "DIFFUSER_JOB_WEBHOOK_URL": "https://hooks.example.com/diffuser",
            "DIFFUSER_JOB_WEBHOOK_SECRET": f"whsec_{key}",
            "DIFFUSER_CACHE_DIR": str(tmp_path),
            "DIFFUSER_PORT": "0",  # should it start after all, it takes no one's port
        },
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("diffuser-api: invalid settings")
    assert "job_webhook_secret" in result.stderr and "15 bytes; it must be 24 to 64" in result.stderr
    assert key not in result.stderr and "Traceback" not in result.stderr
