"""Each model's own defaults (its models-file entry) win over the global settings it inherits."""

from __future__ import annotations

from fastapi.testclient import TestClient

from diffuser_api.models.spec import ModelDefaults
from tests.fakes import FakeModel, FakeRunner, fake_models_app, png_bytes
from tests.unit.test_api import GEN, wait_ready

VARIATIONS = "/v1/images/variations"


def test_steps_guidance_and_variation_strength_come_from_the_model_that_runs(tmp_path):
    quick = FakeModel("quick", FakeRunner("fake#0"), defaults=ModelDefaults(steps=3, guidance_scale=1.5),
                      variation_strength=0.5, pinned=True)
    plain = FakeModel("plain", FakeRunner("other#0"), device="other", pinned=True)
    app = fake_models_app(tmp_path, [quick, plain], default_steps=10, variation_strength=0.9)
    with TestClient(app) as client:
        wait_ready(client)
        for model in ("quick", "plain"):
            assert client.post(GEN, json={"prompt": "x", "size": "32x32", "model": model}).status_code == 200
            files = {"image": ("in.png", png_bytes(), "image/png")}
            assert client.post(VARIATIONS, files=files, data={"model": model, "size": "32x32"}).status_code == 200
    quick_jobs = quick.runner.jobs_seen
    assert [job.steps for job in quick_jobs] == [3, 3]
    assert quick_jobs[0].guidance_scale == 1.5 and quick_jobs[1].strength == 0.5
    # A model without its own defaults keeps the family's steps and guidance (global settings are
    # folded in by the models file itself, not by the service), and the variation strength it was given.
    plain_jobs = plain.runner.jobs_seen
    assert [job.steps for job in plain_jobs] == [4, 4] and plain_jobs[0].guidance_scale == 7.5
    assert plain_jobs[1].strength == 0.7
