"""``GET /playground``: a web page to try the served models, from files in the package.

Public like ``/health``: the page and its assets hold no secret and must load before the
user has typed a key; every API call the page makes carries the key the user gives it.
The files are plain HTML, CSS and JavaScript with no external resources, so the page works
offline and on an air-gapped cluster, and nothing is built at install time.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

PAGE_PATH = "/playground"
ASSETS_PATH = "/playground/assets"
# The page asks the API under this prefix; it is written into the HTML when the app is built.
API_PREFIX_PLACEHOLDER = "__API_PREFIX__"


def playground_page(api_prefix: str) -> str:
    page = files("diffuser_api").joinpath("playground", "index.html").read_text(encoding="utf-8")
    return page.replace(API_PREFIX_PLACEHOLDER, api_prefix)


def install_playground(app: FastAPI, api_prefix: str) -> None:
    """The page is read once: it changes only with the installed package."""
    page = playground_page(api_prefix)
    router = APIRouter(include_in_schema=False)

    @router.get(PAGE_PATH, response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(packages=[("diffuser_api", "playground")]), name="playground-assets")
