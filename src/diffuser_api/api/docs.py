"""``/docs`` (Swagger UI) with its script and styles served from a package.

FastAPI's own page loads them from a CDN, which leaves a blank page on a machine without
internet. ``fastapi-offline`` bundles Swagger UI 5, which renders OpenAPI 3.1 as FastAPI writes
it (Swagger UI 4, as ``swagger-ui-bundle`` has it, refuses 3.1), so the page comes from this
server instead. There is no ``/redoc``: ReDoc's page loads its "API docs by Redocly" logo from
Redocly's CDN whatever it is told, and the server serves nothing that reaches outside.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
# Swagger UI would otherwise send the document's URL to an online validator for its badge.
SWAGGER_PARAMETERS = {"validatorUrl": None}


def install_docs(app: FastAPI) -> None:
    """Call with ``FastAPI(docs_url=None, redoc_url=None)``, so this is the only docs page."""
    router = APIRouter(include_in_schema=False)

    @router.get(DOCS_PATH, response_class=HTMLResponse)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")
