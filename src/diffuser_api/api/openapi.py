"""``/openapi.json`` as clients and fuzzers need it: every body and answer, resolvable.

FastAPI documents what it parses itself. The edit and variation routes read their bodies by
hand (multipart with files, or JSON with data URLs), and the image routes can answer with a
Server-Sent Events stream, so those schemas are declared here and added to the document's
components. FastAPI also documents a 422 on every route with parameters; this server answers
validation errors with 400 through the one error table, so the 422 is taken out again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema, models_json_schema

from diffuser_api.api.responses import COMPONENTS, CompletedImageEvent, PartialImageEvent, omitted, ref
from diffuser_api.api.schemas import EditForm, EditJSONBody, VariationForm

IMAGE_TYPES = "image/png, image/jpeg, image/webp"
# A 16x16 PNG: examples that a client (or a fuzzer's example phase) can send as they are.
EXAMPLE_IMAGE_URL = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mOM6jnBQApgYiARjGoY1TB0NAAAVXEBzuQQlN0AAAAASUVORK5CYII="
)
GENERATION_EXAMPLE = {"prompt": "a lighthouse at dusk, oil painting", "n": 1, "response_format": "b64_json"}
EDIT_EXAMPLE = {"prompt": "the same scene in winter", "images": [{"image_url": EXAMPLE_IMAGE_URL}]}


class EditMultipartBody(EditForm):
    """The multipart edit as OpenAI clients send it: image parts, an optional mask, text fields."""

    image: bytes = Field(description="The image to edit; repeat the part to send several images.")
    image_list: list[bytes] | SkipJsonSchema[None] = omitted(
        "Several images, as the OpenAI SDK sends a list.", alias="image[]"
    )
    mask: bytes | SkipJsonSchema[None] = omitted("Where to edit: transparent pixels are repainted.")


class VariationMultipartBody(VariationForm):
    image: bytes = Field(description="The image to vary.")


def _multipart(model: type[BaseModel], files: tuple[str, ...]) -> dict[str, Any]:
    return {
        "schema": ref(model),
        "encoding": {name: {"contentType": IMAGE_TYPES} for name in files},
    }


GENERATION_REQUEST_BODY = {"requestBody": {"content": {"application/json": {"example": GENERATION_EXAMPLE}}}}
EDIT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": _multipart(EditMultipartBody, ("image", "image[]", "mask")),
    "application/json": {"schema": ref(EditJSONBody), "example": EDIT_EXAMPLE},
}}}
VARIATION_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": _multipart(VariationMultipartBody, ("image",)),
}}}

# Models the routes refer to by hand (above), not through a signature FastAPI reads.
HAND_DOCUMENTED = (EditJSONBody, EditMultipartBody, VariationMultipartBody, PartialImageEvent, CompletedImageEvent)
MULTIPART_BODIES = (EditMultipartBody, VariationMultipartBody)


def text_part(schema: dict[str, Any]) -> dict[str, Any]:
    """A field's schema as a multipart text part: multipart has no null, a field is just left out."""
    options = [option for option in schema.get("anyOf", ()) if option != {"type": "null"}]
    shaped = {key: value for key, value in schema.items() if key != "anyOf" and (key, value) != ("default", None)}
    if len(options) == 1:
        shaped.update(options[0])
    elif options:
        shaped["anyOf"] = options
    return shaped


def hand_documented_schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(model, "validation") for model in HAND_DOCUMENTED], ref_template=f"{COMPONENTS}{{model}}"
    )
    schemas: dict[str, Any] = top["$defs"]
    for model in MULTIPART_BODIES:
        form = schemas[model.__name__]
        form["properties"] = {name: text_part(field) for name, field in form["properties"].items()}
    return schemas


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) the completed document."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in hand_documented_schemas().items():
                components.setdefault(name, schema)
            for operations in spec["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
