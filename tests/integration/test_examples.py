"""Every file in ``examples/`` runs, as a user runs it, against a real server: the exit code is
0, the images it wrote are the ones it should write (names, sizes, all readable) and it says
where it wrote them. A new example without an expectation here fails, so none goes untested."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# The npm package files that sit next to the Node examples.
NOT_EXAMPLES = {"package.json", "package-lock.json"}
RUNNERS = {".py": [sys.executable], ".mjs": ["node"], ".sh": ["bash"]}
# models.example.yaml gives tiny-sd (the default) and the edit models this default size.
SIZE = (64, 64)


def transparent_inside_opaque_outside(path: Path) -> None:
    alpha = np.asarray(Image.open(path).convert("RGBA"))[..., 3]
    assert alpha[alpha.shape[0] // 2, alpha.shape[1] // 2] == 0 and alpha[0, 0] == 255


@dataclass(frozen=True)
class Expected:
    """The images an example writes: file name -> (width, height), plus checks of their own."""

    images: dict[str, tuple[int, int]]
    checks: dict[str, Callable[[Path], None]] = field(default_factory=dict)


def sized(*names: str) -> dict[str, tuple[int, int]]:
    return dict.fromkeys(names, SIZE)


STREAMED = sized("balloon-partial-0.png", "balloon-partial-1.png", "balloon.png")
EXPECTED = {
    "generate.py": Expected(sized("fox-42.png", "fox-43.png")),
    "async_job.py": Expected(sized("lighthouse-7.png", "lighthouse-8.png")),
    "generate_async.py": Expected(sized(
        "a-red-lighthouse-at-dusk.png", "a-paper-boat-on-a-pond.png", "a-cat-made-of-clouds.png")),
    "stream_partial_images.py": Expected(STREAMED),
    "edit_with_mask.py": Expected(
        sized("room.png", "room-mask.png", "room-edited.png"),
        checks={"room-mask.png": transparent_inside_opaque_outside},
    ),
    "variations.py": Expected(sized("teapot.png", "teapot-variation-0.png", "teapot-variation-1.png")),
    "several_models.py": Expected(sized("a-red-apple.png", "a-wicker-basket.png", "apple-in-basket.png")),
    "generate.mjs": Expected(sized("fox-42.png", "fox-43.png")),
    "edit.mjs": Expected(sized("cabin.png", "cabin-winter.png")),
    "stream_partial_images.mjs": Expected(STREAMED),
    "generate.sh": Expected(sized("fox-42.png")),
    "edit_and_vary.sh": Expected(sized("teapot-0.png", "variation-0.png", "variation-1.png", "edited-0.png")),
}


def example_files() -> list[Path]:
    return sorted(path for path in EXAMPLES.iterdir() if path.is_file() and path.name not in NOT_EXAMPLES)


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The server the README's examples section runs them against: ``models.example.yaml``
    (several models, for ``several_models.py``), with uploads limited as in the other tests."""
    server = LiveServer(
        tmp_path_factory.mktemp("examples-server"),
        DIFFUSER_MODELS_FILE=str(ROOT / "models.example.yaml"),
        DIFFUSER_MAX_UPLOAD_BYTES=str(256 * 1024),
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def node_packages() -> None:
    """``make test`` installs them; a bare pytest run installs them here from the lock file."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the Node examples need Node 20 or later")
    if not (EXAMPLES / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "ci", "--prefix", str(EXAMPLES), "--no-audit", "--no-fund"], check=True, timeout=300)


def run_example(example: Path, server: LiveServer, args: list[str], cwd: Path,
                **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "OUTPUT_DIR"}
    environment |= {"OPENAI_BASE_URL": f"{server.base_url}/v1", "OPENAI_API_KEY": "sk-test", **env}
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [*RUNNERS[example.suffix], str(example), *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"{example.name} failed:\n{done.stdout}\n{done.stderr}"
    return done


def assert_wrote(expected: Expected, output_dir: Path, stdout: str) -> None:
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(expected.images)
    pixels = {}
    for name, size in expected.images.items():
        path = output_dir / name
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated or corrupt file raises
            assert (image.format, image.size) == ("PNG", size), name
            pixels[name] = np.asarray(image.convert("RGB")).tobytes()
        assert str(path) in stdout, f"{name} was written but not reported"
        expected.checks.get(name, lambda _: None)(path)
    # Each file is its own image: an example never saves the same answer twice.
    assert len(set(pixels.values())) == len(pixels)


def test_every_example_has_an_expectation_and_every_expectation_an_example():
    assert sorted(path.name for path in example_files()) == sorted(EXPECTED)


@pytest.mark.parametrize("example", example_files(), ids=lambda path: path.name)
def test_example_runs_and_writes_its_images(example: Path, examples_server: LiveServer,
                                            tmp_path: Path, request: pytest.FixtureRequest):
    assert example.suffix in RUNNERS, f"no way to run {example.name}: add its runner to RUNNERS"
    assert example.name in EXPECTED, f"{example.name} has no expectation: add one to EXPECTED"
    if example.suffix == ".mjs":
        request.getfixturevalue("node_packages")
    output_dir, cwd = tmp_path / "out", tmp_path / "cwd"
    done = run_example(example, examples_server, [str(output_dir)], cwd)
    assert_wrote(EXPECTED[example.name], output_dir, done.stdout)
    assert not any(cwd.iterdir()), "an example wrote outside its output folder"


@pytest.mark.parametrize("example", ["generate.py", "generate.mjs", "generate.sh"])
def test_output_folder_from_the_environment(example: str, examples_server: LiveServer,
                                            tmp_path: Path, request: pytest.FixtureRequest):
    if example.endswith(".mjs"):
        request.getfixturevalue("node_packages")
    output_dir = tmp_path / "from-env"
    done = run_example(EXAMPLES / example, examples_server, [], tmp_path / "cwd", OUTPUT_DIR=str(output_dir))
    assert_wrote(EXPECTED[example], output_dir, done.stdout)
