"""The models file: what it means, and that a bad one is refused naming its line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffuser_api.config import Settings
from diffuser_api.config.models_file import ModelsFileError, byte_size, serving_plan
from diffuser_api.domain import (
    CpuOffload,
    MemoryOptions,
    Quantization,
    SpeedOptions,
    StepCache,
    StepCacheMethod,
    Task,
)
from diffuser_api.engine import EngineLimits
from diffuser_api.models.spec import ModelDefaults

EXAMPLE = Path(__file__).resolve().parents[2] / "models.example.yaml"

GOOD = """\
default: tiny-sd
max_loaded_models: 2
memory_budget: 20GiB
host_memory_budget: 0
models:
  - id: tiny-sd
    aliases: [dall-e-2, dall-e-3, gpt-image-1]
    pinned: true
  - id: tiny-qwen-edit
    source: tiny-qwen-image-edit
    device: [cpu]
    dtype: bfloat16
    defaults: {steps: 8, guidance_scale: 1.0, size: 64x96}
    disabled_tasks: [masked_edit]
    variation_strength: 0.5
    engine: {max_batch_size: 4, max_queue_size: 32, batch_wait_ms: 5}
    warmup: false
presets: []
"""


def settings(tmp_path: Path, text: str | None = None, **values) -> Settings:
    if text is not None:
        path = tmp_path / "models.yaml"
        path.write_text(text)
        values["models_file"] = path
    return Settings(_env_file=None, **values)


def test_a_good_file_becomes_a_plan_whose_entries_inherit_the_global_settings(tmp_path):
    plan = serving_plan(settings(
        tmp_path, GOOD, device=["cuda:0", "cuda:1"], torch_dtype="float16", default_steps=20,
        max_queue_size=10, request_timeout_s=60, variation_prompt="again",
    ))
    assert plan.default == "tiny-sd"
    assert (plan.max_loaded_models, plan.memory_budget_bytes, plan.host_memory_budget_bytes) == (2, 20 * 2**30, 0)
    sd, edit = plan.models
    assert (sd.id, sd.source, sd.pinned) == ("tiny-sd", "tiny-sd", True)
    assert sd.aliases == ("dall-e-2", "dall-e-3", "gpt-image-1")
    # Left out: the global settings.
    assert (sd.devices, sd.torch_dtype, sd.warmup) == (("cuda:0", "cuda:1"), "float16", True)
    assert sd.defaults == ModelDefaults(steps=20)
    assert sd.engine == EngineLimits(max_queue_size=10, request_timeout_s=60)
    assert (sd.variation_prompt, sd.variation_strength, sd.disabled_tasks) == ("again", 0.7, frozenset())
    # Set: the entry's own.
    assert (edit.source, edit.pinned, edit.devices, edit.torch_dtype, edit.warmup) == (
        "tiny-qwen-image-edit", False, ("cpu",), "bfloat16", False)
    assert edit.defaults == ModelDefaults(steps=8, guidance_scale=1.0, size=(64, 96))
    assert edit.disabled_tasks == {Task.MASKED_EDIT}
    assert (edit.variation_prompt, edit.variation_strength) == ("again", 0.5)
    assert edit.engine == EngineLimits(max_queue_size=32, max_batch_size=4, batch_wait_s=0.005, request_timeout_s=60)


def test_without_a_file_the_model_id_is_the_one_pinned_model_with_the_global_settings(tmp_path):
    plan = serving_plan(settings(
        tmp_path, model_id="org/some-model", device=["cpu"], torch_dtype="float32", family="sdxl",
        disabled_tasks=["edit"], default_steps=12, default_guidance_scale=3.0, variation_prompt="v",
        variation_strength=0.4, max_batch_size=2, batch_wait_ms=20, warmup=False,
    ))
    (spec,) = plan.models
    assert plan.default == spec.id == spec.source == "org/some-model"
    assert (plan.max_loaded_models, plan.memory_budget_bytes, plan.host_memory_budget_bytes) == (None, None, None)
    assert (spec.pinned, spec.aliases, spec.devices, spec.torch_dtype, spec.family) == (
        True, (), ("cpu",), "float32", "sdxl")
    assert spec.defaults == ModelDefaults(steps=12, guidance_scale=3.0)
    assert (spec.disabled_tasks, spec.variation_prompt, spec.variation_strength, spec.warmup) == (
        {Task.EDIT}, "v", 0.4, False)
    assert spec.engine == EngineLimits(max_batch_size=2, batch_wait_s=0.02)


def test_the_default_is_the_first_model_when_the_file_names_none(tmp_path):
    assert serving_plan(settings(tmp_path, "models:\n  - id: b\n  - id: a\n")).default == "b"


def test_the_shipped_example_is_a_valid_plan_of_three_tiny_families(tmp_path):
    plan = serving_plan(settings(tmp_path, models_file=EXAMPLE))
    assert [spec.source for spec in plan.models] == ["tiny-sd", "tiny-qwen-image-edit", "tiny-qwen-image-edit-plus"]
    assert plan.default == "tiny-sd"
    assert [spec.id for spec in plan.models if spec.pinned] == ["tiny-sd"]
    assert {"dall-e-2", "dall-e-3", "gpt-image-1"} <= set(plan.models[0].aliases)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  - id: a\n    stepz: 3\n",
         "line 3: unknown key 'models[0].stepz'; allowed here: id, source, aliases"),
        ("models:\n  - id: a\n  - id: b\n    defaults:\n      steps: 2\n      szie: 64x64\n",
         "line 6: unknown key 'models[1].defaults.szie'; allowed here: steps, guidance_scale, size"),
        ("models:\n  - id: a\n    engine: {max_batch: 4}\n", "line 3: unknown key 'models[0].engine.max_batch'"),
        ("modelz: []\nmodels:\n  - id: a\n", "line 1: unknown key 'modelz'"),
        ("models:\n  - id: a\n\n    adapters: {style: {sourc: x}}\n",
         "line 4: unknown key 'models[0].adapters.style.sourc'; allowed here: source, weight_name, scale"),
        ("models:\n  - id: a\n    adapters:\n      ../up: {source: x}\n",
         "line 4: 'models[0].adapters.../up': String should match pattern"),
        ("models:\n  - id: a\n    max_loaded_adapters: 0\n",
         "line 3: 'models[0].max_loaded_adapters': Input should be greater than 0"),
        ("models:\n  - id: a\n    adapters_dir: ./nowhere\n", "model 'a': adapters_dir './nowhere' is not a folder"),
        ("models:\n  - id: a\npresets:\n  - id: a\n    model: a\n",
         "line 4: preset 'a' already names model 'a' (line 2)"),
        ("models:\n  - id: a\npresets:\n  - id: fast\n    model: b\n",
         "line 5: preset 'fast' names model 'b', which is no id or alias here; ids: a"),
        ("models:\n  - id: a\npresets:\n  - id: fast\n    model: a\n    loras: [{name: x}]\n",
         "preset 'fast': 'x' is not an adapter of model 'a'; its adapters: none"),
        ("models:\n  - id: a\n    adapters: {x: {source: ./x.safetensors}}\npresets:\n  - id: fast\n    model: a\n"
         "    loras: [{name: x, scale: 9}]\n", "preset 'fast': scale 9 of 'x' is beyond DIFFUSER_MAX_LORA_SCALE (2)"),
        ("models:\n  - id: a\npresets: [fast]\n", "line 3: 'presets[0]': Input should be a valid dictionary"),
        ("models:\n  - id: a\n    speed:\n      step_cache: {method: teacache}\n",
         "line 4: 'models[0].speed.step_cache.method': Input should be 'off', 'first_block_cache', 'taylorseer'"),
        ("models:\n  - id: a\n    speed:\n      step_cache: {method: taylorseer, threshold: 0.1}\n",
         "line 4: 'models[0].speed.step_cache': threshold applies to first_block_cache and magcache only"),
        ("models:\n  - id: a\n    speed:\n      step_cache: {method: magcache, cache_interval: 3}\n",
         "line 4: 'models[0].speed.step_cache': cache_interval applies to taylorseer only"),
        ("models:\n  - id: a\n    speed: {compile: true, turbo: 1}\n",
         "line 3: unknown key 'models[0].speed.turbo'; allowed here: step_cache, compile"),
        ("models:\n  - id: a\n    memory:\n      quantization: int4\n",
         "line 4: 'models[0].memory.quantization': Input should be 'none', 'int8', 'fp8' or 'nf4'"),
        ("models:\n  - id: a\n    memory: {cpu_offload: yes}\n",
         "line 3: 'models[0].memory.cpu_offload': Input should be 'none', 'model' or 'sequential'"),
        ("models:\n  - id: a\n  - id: b\n  - id: a\n",
         "line 4: 'a' already names model 'a' (line 2); every id and alias must name one model"),
        ("models:\n  - id: a\n    aliases: [dall-e-3]\n  - id: b\n    aliases: [x, dall-e-3]\n",
         "line 5: 'dall-e-3' already names model 'a' (line 2)"),
        ("models:\n  - id: a\n    aliases: [b]\n  - id: b\n", "line 4: 'b' already names model 'a' (line 2)"),
        ("models:\n  - id: a\n  - id: b\n    aliases: [a]\n", "line 4: 'a' already names model 'a' (line 2)"),
        ("default: c\nmodels:\n  - id: a\n  - id: b\n",
         "line 1: default 'c' is not the id of a model here; ids: a, b"),
        ("memory_budget: 20 gigs\nmodels:\n  - id: a\n",
         "line 1: 'memory_budget': '20 gigs' is not a size in bytes such as 20GiB"),
        ("models:\n  - id: a\nhost_memory_budget: 3XB\n", "line 3: 'host_memory_budget': '3XB' is not a size in bytes"),
        ("models:\n  - id: a\n    defaults: {size: 64}\n",
         "line 3: 'models[0].defaults.size': '64' is not a size WxH"),
        ("models:\n  - source: tiny-sd\n", "line 2: 'models[0].id' is required"),
        ("models:\n  - id: a\n    id: b\n", "line 3: key 'models[0].id' is written twice"),
        ("models:\n  - id: a\n    device: [cpu\n", "line 4: not valid YAML"),
        ("- id: a\n", "expected a mapping with a 'models' list at the top"),
        ("models:\n  - id: a\n    disabled_tasks: [fly]\n", "line 3: 'models[0].disabled_tasks[0]'"),
        ("models:\n  - id: a\n    engine: {max_batch_size: 0}\n",
         "line 3: 'models[0].engine.max_batch_size': Input should be greater than 0"),
    ],
    ids=lambda value: value.split("\n")[-2] if "\n" in value else value[:30],
)
def test_a_bad_file_is_refused_naming_its_line_and_key(tmp_path, text, expected):
    bad = settings(tmp_path, text)
    with pytest.raises(ModelsFileError) as raised:
        serving_plan(bad)
    assert str(raised.value).startswith(str(bad.models_file)), "the message names the file"
    assert expected in str(raised.value)


def test_a_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ModelsFileError, match="models.yaml: cannot read the models file"):
        serving_plan(Settings(_env_file=None, models_file=tmp_path / "models.yaml"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GiB", 20 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("2 kib", 2048),
     ("1000", 1000), (4096, 4096), (0, 0)],
)
def test_byte_sizes(text, expected):
    assert byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "1.5.2GB", "10 parsecs", -5, True, None])
def test_bad_byte_sizes_are_refused(text):
    with pytest.raises(ValueError, match="is not a size in bytes"):
        byte_size(text)


def test_the_readme_example_is_a_valid_file(tmp_path):
    readme = (EXAMPLE.parent / "README.md").read_text()
    section = readme[readme.index("## Several models"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    example = section[start:section.index("```\n", start)]
    plan = serving_plan(settings(tmp_path, example))
    assert [spec.id for spec in plan.models] == ["tiny-sd", "tiny-qwen-edit"]
    assert plan.models[1].engine.max_batch_size == 4


SPEED = """\
models:
  - id: flux
    source: tiny-flux
    speed:
      step_cache: {method: first_block_cache, threshold: 0.08}
    memory: {quantization: int8, vae_tiling: true}
  - id: sd
    source: tiny-sd
    speed: {compile: true}
  - id: qwen
    source: tiny-qwen-image
    speed:
      step_cache: {method: taylorseer, cache_interval: 4}
"""


def test_speed_and_memory_sections_become_the_specs_options(tmp_path):
    flux, sd, qwen = serving_plan(settings(tmp_path, SPEED)).models
    assert flux.speed == SpeedOptions(StepCache(StepCacheMethod.FIRST_BLOCK_CACHE, threshold=0.08), compile=False)
    assert flux.memory == MemoryOptions(Quantization.INT8, CpuOffload.NONE, vae_tiling=True)
    assert sd.speed == SpeedOptions(compile=True) and not sd.speed.step_cache.on
    assert sd.memory == MemoryOptions()
    assert qwen.speed.step_cache == StepCache(StepCacheMethod.TAYLORSEER, cache_interval=4)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("    warmup: false\n    speed: {compile: true}\n", "model 'a': speed.compile needs the warm-up"),
        ("    speed:\n      compile: true\n      step_cache: {method: taylorseer}\n",
         "model 'a': speed.compile and speed.step_cache do not go together"),
        ("    speed: {compile: true}\n    max_loaded_adapters: 1\n"
         "    adapters: {x: {source: org/x}, y: {source: org/y}}\n",
         r"model 'a': with speed.compile, LoRA adapters are hot-swapped into one slot per adapter a request may "
         r"name \(2\), all held at once; max_loaded_adapters \(1\) must be at least that"),
    ],
)
def test_speed_options_that_cannot_work_together_are_refused(tmp_path, entry, expected):
    with pytest.raises(ModelsFileError, match=expected):
        serving_plan(settings(tmp_path, f"models:\n  - id: a\n{entry}"))
