"""Settings come from defaults, DIFFUSER_* variables, a .env file, and keyword arguments, in that
order of precedence from weakest to strongest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffuser_api.config.settings import Settings
from diffuser_api.domain.requests import Task


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the developer's environment nor a .env in the checkout may leak in."""
    for name in list(os.environ):
        if name.upper().startswith("DIFFUSER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = Settings()
    assert settings.model_id == "tiny-sd"
    assert settings.api_prefix == "/v1"
    assert settings.device == ["auto"]
    assert settings.disabled_tasks == []


@pytest.mark.parametrize("value", ["cuda:0,cuda:1", " cuda:0 , cuda:1 ,", '["cuda:0", "cuda:1"]'])
def test_device_list_from_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DIFFUSER_DEVICE", value)
    assert Settings().device == ["cuda:0", "cuda:1"]


def test_single_device_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSER_DEVICE", "cpu")
    assert Settings().device == ["cpu"]


@pytest.mark.parametrize(
    "value", ["variation,masked_edit", "VARIATION, masked-edit", '["variation", "masked edit (inpainting)"]']
)
def test_disabled_tasks_are_task_enums(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DIFFUSER_DISABLED_TASKS", value)
    assert Settings().disabled_tasks == [Task.VARIATION, Task.MASKED_EDIT]


def test_unknown_disabled_task_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSER_DISABLED_TASKS", "teleport")
    with pytest.raises(ValueError, match="disabled_tasks"):
        Settings()


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DIFFUSER_MODEL_ID=some/model\nDIFFUSER_MAX_N=4\nDIFFUSER_DEVICE=cuda:1\n")
    settings = Settings()
    assert settings.model_id == "some/model"
    assert settings.max_n == 4
    assert settings.device == ["cuda:1"]


def test_environment_beats_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DIFFUSER_MODEL_ID=from/dotenv\n")
    monkeypatch.setenv("DIFFUSER_MODEL_ID", "from/env")
    assert Settings().model_id == "from/env"


def test_keyword_arguments_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSER_MODEL_ID", "from/env")
    monkeypatch.setenv("DIFFUSER_DEVICE", "cuda:0,cuda:1")
    settings = Settings(model_id="from/kwargs", device=["cpu"])
    assert settings.model_id == "from/kwargs"
    assert settings.device == ["cpu"]
