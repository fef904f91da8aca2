"""The README documents every setting, so a new one cannot ship undocumented."""

from __future__ import annotations

from pathlib import Path

from diffuser_api.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_has_a_row_in_the_readme_table():
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `DIFFUSER_")]
    documented = {line.split("`")[1] for line in rows}
    assert {f"DIFFUSER_{name.upper()}" for name in Settings.model_fields} <= documented
