"""``loras`` on requests and presets as model names, through the real API, service and engine
with fake models: what is refused (and how), what reaches the model, and what /v1/models says."""

from __future__ import annotations

import json

import pytest
import yaml
from fastapi.testclient import TestClient

from diffuser_api.config import Settings
from diffuser_api.config.models_file import ModelsFileError, serving_plan
from diffuser_api.domain import LoraChoice
from diffuser_api.models.spec import AdapterSpec, ModelDefaults, PresetSpec
from tests.fakes import FakeModel, FakeRunner, fake_models_app, png_bytes
from tests.unit.test_api import EDIT, GEN, VAR, assert_envelope, wait_ready
from tests.unit.test_keys_models import bearer, sha

ADAPTERS = (AdapterSpec("pixel-art", "/srv/loras/pixel-art.safetensors", scale=0.8),
            AdapterSpec("lightning", "some-org/lightning", weight_name="lora.safetensors"))
FAST = PresetSpec("studio-fast", "studio", (LoraChoice("lightning", 1.0),), ModelDefaults(steps=4, guidance_scale=1.0))


def app_with(tmp_path, runner: FakeRunner, **settings):
    models = [FakeModel("studio", runner, adapters=ADAPTERS), FakeModel("plain", lora=False)]
    return fake_models_app(tmp_path, models, presets=[FAST], **settings)


@pytest.fixture()
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture()
def client(tmp_path, runner):
    with TestClient(app_with(tmp_path, runner)) as test_client:
        wait_ready(test_client)
        yield test_client


def generate(client, **body):
    return client.post(GEN, json={"model": "studio", "prompt": "a fox", "size": "32x32", "seed": 1, **body})


def test_loras_reach_the_job_sorted_with_default_scales_and_scale_zero_dropped(client, runner):
    assert generate(client, loras=[{"name": "pixel-art"}, {"name": "lightning", "scale": -0.5}]).status_code == 200
    assert generate(client, loras=[{"name": "pixel-art", "scale": 0}]).status_code == 200
    assert generate(client).status_code == 200
    assert [job.loras for job in runner.jobs_seen] == [(("lightning", -0.5), ("pixel-art", 0.8)), (), ()]


@pytest.mark.parametrize(("loras", "message"), [
    ([{"name": "watercolor"}], "unknown LoRA adapter 'watercolor'; model 'studio' (fake) has: lightning, pixel-art"),
    ([{"name": "/srv/loras/pixel-art.safetensors"}], "never paths or URLs"),
    ([{"name": "https://example.com/x.safetensors"}], "never paths or URLs"),
    ([{"name": "../pixel-art"}], "never paths or URLs"),
    ([{"name": "pixel-art", "scale": 2.5}], "scale 2.5 of LoRA adapter 'pixel-art' is outside -2..2"),
    ([{"name": "pixel-art", "scale": -3}], "outside -2..2"),
    ([{"name": "pixel-art"}, {"name": "pixel-art", "scale": 1}], "'pixel-art' is named twice"),
    ([{"name": "pixel-art"}] * 5, "at most 4 LoRA adapters per request; got 5"),
])
def test_a_bad_lora_is_a_400_naming_loras_and_the_server_still_serves(client, runner, loras, message):
    error = assert_envelope(generate(client, loras=loras), 400, param="loras", code="invalid_value")
    assert message in error["message"]
    assert "/srv" not in error["message"]  # a registered adapter's source never leaks
    assert runner.jobs_seen == []
    assert generate(client).status_code == 200


@pytest.mark.parametrize("body", [
    {"loras": [{"name": "pixel-art", "path": "/etc/passwd"}]},
    {"loras": [{"url": "https://example.com/x.safetensors"}]},
    {"loras": "pixel-art"},
])
def test_a_lora_entry_with_a_path_or_url_field_or_no_list_is_a_400(client, body):
    error = assert_envelope(generate(client, **body), 400)
    assert error["param"].startswith("loras"), error
    assert generate(client).status_code == 200


def test_loras_on_a_model_without_lora_support_is_a_400_naming_it(client):
    error = assert_envelope(generate(client, model="plain", loras=[{"name": "x"}]), 400, param="loras",
                            code="unsupported_parameter")
    assert "model 'plain'" in error["message"]
    assert generate(client, model="plain").status_code == 200


def test_edits_and_variations_take_loras_as_multipart_json(client, runner):
    loras = json.dumps([{"name": "pixel-art", "scale": 0.5}])
    edit = client.post(EDIT, files={"image": ("a.png", png_bytes())},
                       data={"model": "studio", "prompt": "x", "loras": loras, "size": "32x32"})
    variation = client.post(VAR, files={"image": ("a.png", png_bytes())},
                            data={"model": "studio", "loras": loras, "size": "32x32"})
    assert (edit.status_code, variation.status_code) == (200, 200), (edit.text, variation.text)
    assert [job.loras for job in runner.jobs_seen] == [(("pixel-art", 0.5),)] * 2
    bad = client.post(EDIT, files={"image": ("a.png", png_bytes())},
                      data={"model": "studio", "prompt": "x", "loras": "pixel-art"})
    assert "JSON list" in assert_envelope(bad, 400)["message"]


def test_a_preset_applies_its_loras_and_defaults_unless_the_request_overrides(client, runner):
    assert generate(client, model="studio-fast").status_code == 200
    assert generate(client, model="studio-fast", num_inference_steps=2, loras=[]).status_code == 200
    assert generate(client, model="studio-fast", loras=[{"name": "pixel-art"}]).status_code == 200
    first, overridden, other = runner.jobs_seen
    assert (first.steps, first.guidance_scale, first.loras) == (4, 1.0, (("lightning", 1.0),))
    assert (overridden.steps, overridden.loras) == (2, ())
    assert (other.steps, other.loras) == (4, (("pixel-art", 0.8),))


def test_models_list_presets_and_describe_adapters(client):
    cards = client.get("/v1/models").json()["data"]
    assert [card["id"] for card in cards] == ["studio", "plain", "studio-fast"]
    assert cards[2]["parent"] == "studio" and cards[2]["status"] == cards[0]["status"]
    preset = client.get("/v1/models/studio-fast").json()
    assert preset["loras"] == [{"name": "lightning", "scale": 1.0}]
    assert preset["defaults"] == {"steps": 4, "guidance_scale": 1.0}
    studio = client.get("/v1/models/studio").json()
    assert studio["lora"] is True
    assert studio["adapters"] == [{"name": "pixel-art", "scale": 0.8, "loaded": False},
                                  {"name": "lightning", "scale": 1.0, "loaded": False}]
    assert client.get("/v1/models/plain").json()["lora"] is False


def test_a_key_may_use_the_presets_of_its_models_and_a_listed_preset_but_not_its_model_bare(tmp_path, runner):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [
        {"name": "preset-only", "key_sha256": sha("sk-preset"), "models": ["studio-fast"]},
        {"name": "studio", "key_sha256": sha("sk-studio"), "models": ["studio"]},
    ]}))
    with TestClient(app_with(tmp_path, runner, api_keys_file=keys_file)) as client:
        wait_ready(client)
        preset_only, studio = bearer("sk-preset"), bearer("sk-studio")
        assert generate(client, model="studio-fast").status_code == 401
        assert client.post(GEN, json={"model": "studio-fast", "prompt": "x", "size": "32x32"},
                           headers=preset_only).status_code == 200
        bare = client.post(GEN, json={"model": "studio", "prompt": "x", "size": "32x32"}, headers=preset_only)
        assert "Served models: studio-fast" in assert_envelope(bare, 404, code="model_not_found")["message"]
        assert [card["id"] for card in client.get("/v1/models", headers=preset_only).json()["data"]] == [
            "studio-fast"]
        assert [card["id"] for card in client.get("/v1/models", headers=studio).json()["data"]] == [
            "studio", "studio-fast"]
        assert client.post(GEN, json={"model": "studio-fast", "prompt": "x", "size": "32x32"},
                           headers=studio).status_code == 200


def test_the_models_file_registers_adapters_from_entries_and_a_folder_and_resolves_presets(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "ink.safetensors").write_bytes(b"")
    (folder / "pixel-art.safetensors").write_bytes(b"")
    (tmp_path / "models.yaml").write_text(
        "models:\n"
        "  - id: tiny-sdxl\n    aliases: [xl]\n    adapters_dir: loras\n    max_loaded_adapters: 3\n"
        "    adapters:\n"
        "      pixel-art: {source: ./loras/pixel-art.safetensors, scale: 0.8}\n"
        "      lightning: {source: some-org/some-lightning-lora, weight_name: lora.safetensors}\n"
        "  - id: tiny-sd\n"
        "presets:\n  - id: tiny-sdxl-fast\n    model: xl\n    loras: [{name: lightning, scale: 1.0}]\n"
        "    defaults: {steps: 4, guidance_scale: 1.0}\n"
    )
    plan = serving_plan(Settings(_env_file=None, models_file=tmp_path / "models.yaml", max_loaded_adapters=5))
    xl, sd = plan.models
    assert {adapter.name: adapter for adapter in xl.adapters} == {
        "ink": AdapterSpec("ink", str(folder / "ink.safetensors")),
        "pixel-art": AdapterSpec("pixel-art", str(folder / "pixel-art.safetensors"), scale=0.8),
        "lightning": AdapterSpec("lightning", "some-org/some-lightning-lora", "lora.safetensors"),
    }
    assert (xl.max_loaded_adapters, sd.max_loaded_adapters, sd.adapters) == (3, 5, ())
    assert plan.presets == (PresetSpec("tiny-sdxl-fast", "tiny-sdxl", (LoraChoice("lightning", 1.0),),
                                       ModelDefaults(steps=4, guidance_scale=1.0)),)


def test_a_preset_whose_default_size_its_model_refuses_stops_the_start(tmp_path):
    bad = PresetSpec("studio-odd", "studio", defaults=ModelDefaults(size=(30, 30)))
    with pytest.raises(ModelsFileError, match=r"preset 'studio-odd': defaults.size '30x30' is not WxH"):
        fake_models_app(tmp_path, [FakeModel("studio", adapters=ADAPTERS)], presets=[bad])
