"""Schemathesis fuzzes a live server from its own ``/openapi.json``.

Every documented operation gets schema-derived requests, valid and invalid, over real HTTP
(uvicorn on a port, the fake model so it runs in seconds). Every answer must be documented:
no 5xx, a status code the document lists for that operation, a content type it lists, and a
body matching the listed schema (SSE events included). Caps are small so that the valid
requests the fuzzer finds finish quickly; the draw is seeded so a failure reproduces.

Schemathesis's engine runs here rather than its pytest plugin: the plugin's lazy schemas
(``from_fixture``, needed to load the schema from a server started by a fixture) do not run
under pytest 9.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import from_schema
from schemathesis.engine.events import FatalError, NonFatalError, ScenarioFinished
from schemathesis.engine.recorder import CheckFailureInfo, ScenarioRecorder

from tests.fakes import fake_app, png_bytes
from tests.servers import ThreadedServer

CHECKS = ("status_code_conformance", "content_type_conformance", "response_schema_conformance")
# 501 is the documented answer when the model cannot do a task (the fake cannot edit several
# images); any other 5xx is a failure: the model is ready and nothing here is slow.
DELIBERATE_STATUSES = ["2XX", "3XX", "4XX", 501]
FUZZ_CONFIG = {
    "seed": 20250101,
    "generation": {"max-examples": 25, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True, "expected-statuses": DELIBERATE_STATUSES},
        **{name: {"enabled": True} for name in CHECKS},
    },
}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    # No keys and admin_open off (the defaults): the admin routes are fuzzed and answer their
    # documented 403, so no fuzzed request can unload the model under the other operations.
    app = fake_app(
        tmp_path_factory.mktemp("fuzz"),
        max_steps=4,
        max_n=2,
        max_json_bytes=256 * 1024,
        max_edit_bytes=512 * 1024,
    )
    with ThreadedServer(app) as server:
        server.wait_ready()
        yield server


def fuzz(base_url: str) -> tuple[dict[str, set[int]], list[str]]:
    """The statuses each operation answered the fuzzer with, and one line per failed check or
    engine error."""
    config = SchemathesisConfig.from_dict(FUZZ_CONFIG)
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config)
    answered: dict[str, set[int]] = defaultdict(set)
    failures: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, ScenarioFinished):
            answered[event.recorder.label] |= {
                interaction.response.status_code
                for interaction in event.recorder.interactions.values()
                if interaction.response is not None
            }
            failures += [
                described(event.recorder, case_id, check.failure_info)
                for case_id, checks in event.recorder.checks.items()
                for check in checks
                if check.failure_info is not None
            ]
        elif isinstance(event, NonFatalError):
            failures.append(f"{event.label}: {event.info.message}")
        elif isinstance(event, FatalError):
            failures.append(f"fatal: {event.exception!r}")
    return answered, failures


def described(recorder: ScenarioRecorder, case_id: str, info: CheckFailureInfo) -> str:
    """The failed check, what the server answered, and a curl line that sends the request again."""
    interaction = recorder.interactions.get(case_id)
    answer = interaction.response if interaction is not None else None
    answered = f"{answer.status_code} {answer.content[:500]!r}" if answer is not None else "no answer"
    return f"{recorder.label}: {info.failure.title}: {info.failure.message}\nanswered {answered}\n{info.code_sample}"


@pytest.mark.slow
def test_every_answer_is_documented(live_server: ThreadedServer) -> None:
    documented = httpx.get(f"{live_server.base_url}/openapi.json").json()["paths"]
    operations = {f"{method.upper()} {path}" for path, methods in documented.items() for method in methods}

    answered, failures = fuzz(live_server.base_url)

    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert set(answered) == operations
    # Valid requests got through too, not only refusals: every image route made images.
    assert all(200 in answered[f"POST /v1/images/{name}"] for name in ("generations", "edits", "variations"))
    response = httpx.post(f"{live_server.base_url}/v1/images/edits", files={"image": ("a.png", png_bytes())},
                          data={"prompt": "still serving", "size": "32x32"})
    assert response.status_code == 200
