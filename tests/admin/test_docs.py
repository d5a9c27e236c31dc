"""The API's documentation pages work without internet access: ``/docs`` (Swagger UI) and
``/redoc`` reference only URLs of the orchestrator itself, and those answer with the assets."""

from __future__ import annotations

import re

import pytest

from tests.admin.conftest import Stack

pytestmark = pytest.mark.rabbitmq

#: every URL an HTML page makes the browser load: attributes, and the spec URL in a script
_REFERENCES = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")
_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "json"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_pages_load_every_asset_from_the_orchestrator(
    stack: Stack, page: str
) -> None:
    answer = await stack.client.get(page, headers={"Authorization": ""})  # public, no token
    assert answer.status_code == 200, answer.text
    html = answer.text
    assert "://" not in html, "a URL of another host"
    found = [a or b for a, b in _REFERENCES.findall(html)]
    scripts = [url for url in found if url.endswith(".js")]
    assert scripts, f"no script in {page}: {html}"
    assert "/openapi.json" in found
    for url in found:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = await stack.client.get(url, headers={"Authorization": ""})
        assert asset.status_code == 200, (url, asset.status_code)
        suffix = url[url.rfind(".") :]
        assert _TYPES[suffix] in asset.headers["content-type"], (url, asset.headers)
        assert len(asset.content) > (100_000 if suffix == ".js" else 100), url
