"""``/openapi.json`` is a valid document that says what the server really takes and answers.

The live fuzzing (tests/integration/test_schema_fuzz.py) checks every answer against it over
real HTTP; these are the fast checks: the document is valid, every reference resolves, every
error status is documented with the envelope, and real answers match the documented schemas.
"""

from __future__ import annotations

import time
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from diffuser_api.api.openapi import EDIT_EXAMPLE, GENERATION_EXAMPLE
from diffuser_api.api.schemas import EditForm
from tests.fakes import fake_app, png_bytes

ERROR_REF = "#/components/schemas/ErrorResponse"
EVERY_ROUTE = {"400", "408", "413", "500", "503"}
KEYED_ROUTE = {"401", "429"}
IMAGE_ROUTES = ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations")


@pytest.fixture()
def client(tmp_path):
    with TestClient(fake_app(tmp_path)) as test_client:
        deadline = time.monotonic() + 10
        while test_client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.01)
        yield test_client


@pytest.fixture()
def spec(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{method.upper()} {path}": operation
            for path, methods in spec["paths"].items() for method, operation in methods.items()}


def references(node: Any) -> list[str]:
    """Every ``$ref`` in the document, however deep."""
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    if not isinstance(node, dict):
        return []
    found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
    return found + [ref for value in node.values() for ref in references(value)]


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def schema_validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for one documented schema, its ``#/components/...`` references resolved."""
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def component(spec: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return schema_validator(spec, {"$ref": f"#/components/schemas/{name}"})


def answer_schema(spec: dict[str, Any], path: str, method: str, status: int, media_type: str = "application/json"):
    schema = spec["paths"][path][method]["responses"][str(status)]["content"][media_type]["schema"]
    return schema_validator(spec, schema)


def test_the_document_is_valid_openapi_and_every_reference_resolves(spec):
    validate(spec)
    refs = references(spec)
    assert "#/components/schemas/EditJSONBody" in refs
    for ref in refs:
        resolve(spec, ref)


def test_every_operation_documents_its_errors_in_the_envelope_and_no_422(spec):
    for label, operation in operations(spec).items():
        responses = operation["responses"]
        public = label in ("GET /health", "GET /v1/images/files/{name}", "GET /v1/images/files/jobs/{name}")
        expected = EVERY_ROUTE | (set() if public else KEYED_ROUTE)
        assert expected <= set(responses), label
        assert "422" not in responses, label  # validation errors answer 400
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (label, status)
    for path in IMAGE_ROUTES:
        assert {"404", "429", "501", "503", "504"} <= set(spec["paths"][path]["post"]["responses"])
    assert "404" in spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_bodies_read_by_hand_are_documented_with_their_real_fields(spec):
    edit = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert set(edit) == {"multipart/form-data", "application/json"}
    form = resolve(spec, edit["multipart/form-data"]["schema"]["$ref"])
    binary = {"type": "string", "format": "binary"}
    assert {key: form["properties"]["image"][key] for key in binary} == binary
    assert form["properties"]["image[]"]["items"] == binary
    assert {key: form["properties"]["mask"][key] for key in binary} == binary
    assert set(form["required"]) == {"prompt", "image"}
    assert set(EditForm.model_fields) <= set(form["properties"])
    # Multipart has no null: text fields are left out, never sent as null.
    assert not [name for name, field in form["properties"].items() if "null" in str(field)]
    variation = spec["paths"]["/v1/images/variations"]["post"]["requestBody"]["content"]
    assert resolve(spec, variation["multipart/form-data"]["schema"]["$ref"])["required"] == ["image"]
    component(spec, "EditJSONBody").validate(EDIT_EXAMPLE)
    component(spec, "GenerationBody").validate(GENERATION_EXAMPLE)


def test_answers_that_are_not_json_are_documented_with_their_media_types(spec):
    for path in ("/v1/images/generations", "/v1/images/edits"):
        assert set(spec["paths"][path]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                   "text/event-stream"}
    assert set(spec["paths"]["/v1/images/variations"]["post"]["responses"]["200"]["content"]) == {"application/json"}
    files = spec["paths"]["/v1/images/files/{name}"]["get"]["responses"]["200"]["content"]
    assert set(files) == {"image/png", "image/jpeg", "image/webp"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_documented_examples_are_served(client):
    assert client.post("/v1/images/generations", json=GENERATION_EXAMPLE).status_code == 200
    assert client.post("/v1/images/edits", json=EDIT_EXAMPLE).status_code == 200


def test_real_answers_match_the_documented_schemas(client, spec):
    generation = client.post("/v1/images/generations", json={"prompt": "a fox", "n": 2, "size": "32x32"})
    answer_schema(spec, "/v1/images/generations", "post", 200).validate(generation.json())
    stored = client.post("/v1/images/variations", files={"image": ("a.png", png_bytes())},
                         data={"response_format": "url", "size": "32x32"})
    answer_schema(spec, "/v1/images/variations", "post", 200).validate(stored.json())
    for path, schema_name in (("/", "ServiceInfo"), ("/health", "HealthResponse"), ("/v1/models", "ModelList"),
                              ("/v1/models/fake-model", "ModelDetails")):
        response = client.get(path)
        assert response.status_code == 200
        component(spec, schema_name).validate(response.json())
    refused = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "13x7"})
    assert refused.status_code == 400
    answer_schema(spec, "/v1/images/generations", "post", 400).validate(refused.json())


def test_keys_left_out_are_documented_as_optional_not_null(spec):
    images = component(spec, "ImagesResponse")
    answer = {"created": 1, "data": [{"b64_json": "AA==", "seed": 3}], "background": "opaque", "output_format": "png"}
    images.validate(answer)
    assert not images.is_valid({**answer, "size": None})
    assert not images.is_valid({**answer, "data": [{"b64_json": "AA==", "url": None, "seed": 3}]})
    error = component(spec, "ErrorResponse")
    error.validate({"error": {"message": "m", "type": "t", "param": None, "code": None, "request_id": "r"}})
    assert not error.is_valid({"error": {"message": "m", "type": "t"}})


def test_model_routes_document_statuses_details_and_admin_answers(spec):
    for action in ("load", "unload"):
        responses = spec["paths"][f"/v1/models/{{model_id}}/{action}"]["post"]["responses"]
        assert {"200", "202", "401", "403", "404"} <= set(responses)
        for status in ("200", "202"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ModelCard"}
    health = spec["paths"]["/health"]["get"]
    assert [parameter["name"] for parameter in health["parameters"]] == ["model"]
    assert {"200", "404", "503"} <= set(health["responses"])
    status = spec["components"]["schemas"]["ModelCard"]["properties"]["status"]
    assert set(status["enum"]) == {"ready", "loading", "offloaded", "unloaded", "failed"}


def test_admin_answers_match_the_documented_schemas(tmp_path):
    with TestClient(fake_app(tmp_path, admin_open=True)) as client:
        spec = client.get("/openapi.json").json()
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.01)
        unload = client.post("/v1/models/fake-model/unload")
        assert unload.status_code == 202
        answer_schema(spec, "/v1/models/{model_id}/unload", "post", 202).validate(unload.json())
        while (details := client.get("/v1/models/fake-model")).json()["status"] != "unloaded":
            assert time.monotonic() < deadline, "the model never unloaded"
            time.sleep(0.01)
        component(spec, "ModelDetails").validate(details.json())
        component(spec, "ModelList").validate(client.get("/v1/models").json())
        component(spec, "ServiceInfo").validate(client.get("/").json())
        load = client.post("/v1/models/fake-model/load")
        answer_schema(spec, "/v1/models/{model_id}/load", "post", load.status_code).validate(load.json())
        refused = client.post("/v1/models/nope/load")
        answer_schema(spec, "/v1/models/{model_id}/load", "post", 404).validate(refused.json())
