"""The console's shipped files and response headers, without a browser: under 300 KB in all, no inline
script or style in the page, the vendored chart library with its license, and every /ui response with a
Content-Security-Policy that allows neither inline code nor eval."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.routes.console import STATIC_DIR, install

MAX_BYTES = 300 * 1024


def client() -> TestClient:
    app = FastAPI()
    install(app)
    return TestClient(app)


def test_shipped_assets_stay_under_300_kb_with_the_chart_license():
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < MAX_BYTES, f"{total} bytes"
    names = {p.relative_to(STATIC_DIR).as_posix() for p in files}
    assert {"index.html", "vendor/uPlot.iife.min.js", "vendor/uPlot.LICENSE"} <= names


def test_no_inline_code_in_the_page_or_the_scripts():
    html = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert not re.search(r"<[^>]+\sstyle=", html) and "<style" not in html  # no inline styles
    assert not re.search(r"<[^>]+\son[a-z]+=", html)  # no inline event handlers
    for js in (STATIC_DIR / "js").glob("*.js"):
        code = js.read_text()
        assert "innerHTML" not in code and "eval(" not in code and "new Function" not in code, js.name


def test_every_console_response_sends_a_strict_csp():
    with client() as c:
        redirect = c.get("/ui", follow_redirects=False)
        assert redirect.status_code == 308 and redirect.headers["location"] == "/ui/"
        for path in ("/ui/", "/ui/js/main.js", "/ui/vendor/uPlot.iife.min.js", "/ui/console.css", "/ui/methods.json"):
            r = c.get(path)
            assert r.status_code == 200, path
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/ui/js/main.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
        assert c.get("/ui/nope.js").status_code == 404


def test_methods_lists_each_method_with_its_defaults():
    with client() as c:
        methods = c.get("/ui/methods.json").json()
    assert set(methods) == {"lora", "s2ft", "medusa"}
    assert methods["lora"]["rank"] == 8 and methods["lora"]["type"] == "lora"
