"""Size rules say exactly what they refuse, fit() stays inside them, and settings only remove tasks."""

from __future__ import annotations

import pytest

from diffuser_api.domain.capabilities import Capabilities, SizeRules
from diffuser_api.domain.requests import Task
from diffuser_api.errors import InvalidRequest

RULES = SizeRules(multiple=8, min_side=64, max_side=2048, default_width=512, default_height=512)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (512, 768), (2048, 2048), (64, 2048), (1024, 1536)])
def test_allowed_sizes_pass(width: int, height: int) -> None:
    RULES.check(width, height, requested=f"{width}x{height}")


@pytest.mark.parametrize(
    ("width", "height"),
    [(513, 512), (512, 100), (56, 512), (512, 2056), (4096, 4096), (0, 512)],
    ids=["width-not-multiple", "height-not-multiple", "too-small", "too-large", "both-too-large", "zero"],
)
def test_refused_sizes_name_the_rule(width: int, height: int) -> None:
    requested = f"{width}x{height}"
    with pytest.raises(InvalidRequest) as caught:
        RULES.check(width, height, requested=requested)
    assert caught.value.param == "size"
    assert caught.value.message == f"size '{requested}' is not WxH with multiples of 8 between 64 and 2048"


@pytest.mark.parametrize(
    ("size", "fitted"),
    [((512, 512), (512, 512)), ((1001, 667), (1000, 664)), ((20, 30), (64, 64)), ((5000, 299), (2048, 296))],
)
def test_fit_snaps_to_the_multiple_within_bounds(size: tuple[int, int], fitted: tuple[int, int]) -> None:
    assert RULES.fit(*size) == fitted


@pytest.mark.parametrize(
    "rules",
    [
        RULES,
        SizeRules(multiple=16, min_side=60, max_side=1020, default_width=512, default_height=512),
        SizeRules(multiple=64, min_side=65, max_side=1000, default_width=512, default_height=512),
    ],
    ids=["bounds-are-multiples", "bounds-not-multiples", "coarse-multiple"],
)
def test_fitted_size_always_passes_check(rules: SizeRules) -> None:
    for side in [1, 59, 60, 65, 100, 999, 1000, 1013, 1019, 1020, 1021, 3000]:
        width, height = rules.fit(side, side)
        rules.check(width, height, requested=f"{width}x{height}")


def capabilities(tasks: set[Task]) -> Capabilities:
    return Capabilities(
        family="test",
        tasks=frozenset(tasks),
        extras=frozenset({"seed"}),
        size=RULES,
        default_steps=20,
        default_guidance_scale=7.5,
        default_strength=0.8,
        variation_method="img2img",
        max_input_images=2,
        notes=("a note",),
    )


def test_without_removes_tasks_and_keeps_the_rest() -> None:
    full = capabilities({Task.GENERATION, Task.EDIT, Task.MASKED_EDIT})
    reduced = full.without(frozenset({Task.EDIT}))
    assert reduced.tasks == {Task.GENERATION, Task.MASKED_EDIT}
    assert reduced == capabilities({Task.GENERATION, Task.MASKED_EDIT})
    assert full.tasks == {Task.GENERATION, Task.EDIT, Task.MASKED_EDIT}


def test_without_never_adds_tasks() -> None:
    reduced = capabilities({Task.GENERATION}).without(frozenset({Task.VARIATION, Task.EDIT}))
    assert reduced.tasks == {Task.GENERATION}
