"""Family detection, the README's generated table, and the scoped Qwen working area."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

from diffuser_api.errors import NotSupported
from diffuser_api.models.families import FAMILIES, family_for
from diffuser_api.models.family_table import render_family_table
from diffuser_api.models.qwen_working_area import working_area

README = Path(__file__).parents[2] / "README.md"


def test_readme_family_table_matches_the_code():
    match = re.search(r"<!-- families:start[^\n]*-->\n(.*?)<!-- families:end -->", README.read_text(), re.S)
    assert match, "README lacks the families markers"
    assert match[1] == render_family_table(), "run python -m diffuser_api.models.family_table and paste it"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_every_pipeline_class_finds_its_family(family):
    for pipeline_class in family.pipeline_classes:
        assert family_for(pipeline_class) is family


def test_setting_overrides_detection_and_unknown_names_are_refused():
    assert family_for("StableDiffusionPipeline", "sdxl").name == "sdxl"
    with pytest.raises(NotSupported, match="known families: stable-diffusion, sdxl"):
        family_for("StableDiffusionPipeline", "no-such-family")
    with pytest.raises(NotSupported, match="pipeline class WuerstchenPipeline"):
        family_for("WuerstchenPipeline")


def test_working_area_replaces_only_the_1mpix_target_and_only_in_scope():
    calculate = pipeline_qwenimage_edit.calculate_dimensions
    assert calculate(1024 * 1024, 1.0)[:2] == (1024, 1024)
    seen_elsewhere = []
    with working_area(96 * 64):
        assert calculate(1024 * 1024, 1.5)[:2] == (96, 64)
        # Plus's 384x384 vision-encoder size is another target: untouched.
        assert pipeline_qwenimage_edit_plus.calculate_dimensions(384 * 384, 1.0) == (384, 384)
        other = threading.Thread(target=lambda: seen_elsewhere.append(calculate(1024 * 1024, 1.0)[:2]))
        other.start()
        other.join()
    assert seen_elsewhere == [(1024, 1024)], "the override leaked into another thread"
    assert calculate(1024 * 1024, 1.0)[:2] == (1024, 1024)
