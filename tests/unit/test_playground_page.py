"""``/playground`` and ``/docs`` as served: public where they must be, nothing loaded from outside.

The pages themselves run in a browser in ``tests/integration/test_playground.py``.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from tests.fakes import fake_app
from tests.unit.test_api import assert_envelope, assert_still_serves, wait_ready

KEY = "sk-playground-0123"
PLAYGROUND_ASSETS = ("main.js", "api.js", "mask.js", "playground.css")


class ResourceLinks(HTMLParser):
    """Every ``src`` and ``href`` in a page, and the URLs its inline scripts and styles name."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.inline = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data: str) -> None:
        self.inline += data


def external_urls(html: str) -> list[str]:
    parser = ResourceLinks()
    parser.feed(html)
    inline = re.findall(r"(?:https?:)?//[\w.-]+\.\w+", parser.inline)
    return [link for link in parser.links if re.match(r"(https?:)?//", link)] + inline


@pytest.fixture()
def client(tmp_path):
    with TestClient(fake_app(tmp_path)) as client:
        wait_ready(client)
        yield client


def test_the_playground_page_and_its_assets_are_served_from_the_package(client):
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-api-prefix="/v1"' in page.text
    for field in ('<textarea id="prompt" name="prompt"', '<select id="model" name="model"', 'type="submit"',
                  'id="results"'):
        assert field in page.text
    assert 'src="playground/assets/main.js"' in page.text and 'href="playground/assets/playground.css"' in page.text
    for asset in PLAYGROUND_ASSETS:
        response = client.get(f"/playground/assets/{asset}")
        assert response.status_code == 200, asset
        expected = "text/css" if asset.endswith(".css") else "text/javascript"
        assert response.headers["content-type"].startswith(expected)


def test_the_page_calls_the_api_under_the_configured_prefix(tmp_path):
    with TestClient(fake_app(tmp_path, api_prefix="/api/v2")) as client:
        assert 'data-api-prefix="/api/v2"' in client.get("/playground").text


def test_nothing_served_loads_from_outside(client):
    for path in ("/playground", "/docs"):
        html = client.get(path).text
        assert external_urls(html) == [], path
    # The playground's own scripts and styles name no outside address at all.
    for asset in PLAYGROUND_ASSETS:
        assert not re.search(r"https?://", client.get(f"/playground/assets/{asset}").text), asset


def test_docs_use_the_bundled_swagger_ui(client):
    html = client.get("/docs").text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"):
        assert f'"/docs/assets/{asset}"' in html
        assert client.get(f"/docs/assets/{asset}").status_code == 200
    assert '"validatorUrl": null' in html  # no badge fetched from the online validator
    # ReDoc's page loads a logo from a CDN, so there is none; pages are not API operations.
    assert_envelope(client.get("/redoc"), 404)
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/playground", "/docs"} & set(paths)
    assert_still_serves(client)


def test_with_keys_on_the_page_loads_without_one_and_the_api_still_needs_it(tmp_path):
    with TestClient(fake_app(tmp_path, api_keys=[KEY])) as client:
        assert client.get("/playground").status_code == 200
        assert client.get("/playground/assets/main.js").status_code == 200
        for path in ("/v1/models", "/", "/docs", "/playground-other"):
            assert_envelope(client.get(path), 401)
        assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_unknown_assets_are_404_envelopes(client):
    assert_envelope(client.get("/playground/assets/nope.js"), 404)
    # An encoded climb out of the assets folder finds nothing either.
    assert_envelope(client.get("/playground/assets/..%2F..%2Fapi%2Fapp.py"), 404)
    assert_still_serves(client)
