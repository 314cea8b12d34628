"""The built site in a real browser: a local server, the system's Chromium, and the page list.

``nox -s tests`` builds the HTML first and names its folder in ``FIELD_GUIDE_SITE``; without
it these tests look for ``docs/_build/html``. The site is served on 127.0.0.1 the way GitHub
Pages serves it: under the path of ``html_baseurl`` (``/field-guide/``), text compressed with
gzip, and ``404.html`` for any missing address.

Chromium is the system's (Debian's ``chromium`` package, which ``.ci/run`` installs), driven
by Playwright; Playwright's own browser download is never used. With no Chromium or no built
site a local run skips these tests, saying why; with ``CI=true`` that is a failure instead.
"""

import functools
import gzip
import http.server
import json
import mimetypes
import os
import shutil
import statistics
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).parents[2]
IN_CI = os.environ.get("CI") == "true"
CHROMIUM_NAMES = ["chromium", "chromium-browser", "google-chrome-stable", "google-chrome"]
# What the machines this project runs on need: no sandbox as root, and no background
# connections to Google's servers, which a closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Pages that Sphinx writes from no source: no "edit this page" link, no search term.
GENERATED = {"genindex.html", "search.html", "py-modindex.html", "404.html"}
# GitHub Pages and Read the Docs compress these; fonts and images are compressed already.
COMPRESSED_TYPES = ("text/", "application/javascript", "application/json", "image/svg+xml", "application/xml")


def unavailable(reason: str):
    """Skip locally; in CI a browser test that cannot run is a failure, not a skip."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true, where the browser tests must run)", pytrace=False)
    pytest.skip(reason)


# -- The built site, read as files -------------------------------------------------------------


class PageParser(HTMLParser):
    """What the tests need from one HTML file: ids, links, the title and the math."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.canonical: str | None = None
        self.meta: dict[str, str] = {}  # <meta property|name=... content=...>
        self.title = ""
        self.math = 0
        self._in_h1 = self._in_headerlink = False
        self._seen_h1 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        for key in ("id", "name") if tag == "a" else ("id",):
            if attrs.get(key):
                self.ids.add(attrs[key])
        if tag == "a" and attrs.get("href") is not None:
            self.links.append(attrs["href"])
            self._in_headerlink = self._in_h1 and "headerlink" in classes
        if tag == "meta" and (key := attrs.get("property") or attrs.get("name")):
            self.meta[key] = attrs.get("content") or ""
        if tag == "link" and attrs.get("rel") == "canonical":
            self.canonical = attrs.get("href")
        if tag == "h1" and not self._seen_h1:
            self._in_h1 = self._seen_h1 = True
        if tag in ("span", "div") and "math" in classes:
            self.math += 1

    def handle_endtag(self, tag):
        if tag == "h1":
            self._in_h1 = False
        if tag == "a":
            self._in_headerlink = False

    def handle_data(self, data):
        if self._in_h1 and not self._in_headerlink:
            self.title += data


@dataclass
class Page:
    path: str  # relative to the site's root, e.g. "distillation.html"
    ids: set[str]
    links: list[str]
    title: str
    math: int  # how many equations (inline or displayed) the page holds
    canonical: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Site:
    root: Path
    prefix: str = "/"  # the path the site is served under, e.g. "/field-guide/"
    base_url: str = ""  # set once the server runs: http://127.0.0.1:PORT/field-guide/
    pages: dict[str, Page] = field(default_factory=dict)
    parsed: dict[str, Page] = field(default_factory=dict, repr=False)

    def url(self, path: str) -> str:
        return self.base_url + path

    def read(self, path: str) -> Page:
        if path in self.parsed:
            return self.parsed[path]
        parser = PageParser()
        parser.feed((self.root / path).read_text(encoding="utf-8"))
        title = " ".join(parser.title.split())
        page = Page(path, parser.ids, parser.links, title, parser.math, parser.canonical, parser.meta)
        self.parsed[path] = page
        return page

    def local_path(self, url: str) -> str | None:
        """The file a URL on this site names ('' for the root), or None for another site."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not self.base_url.startswith(
            f"{parts.scheme}://{parts.netloc}"
        ):
            return None
        path = unquote(parts.path)
        if not path.startswith(self.prefix):
            return None
        return path[len(self.prefix) :]

    def crawl(self) -> None:
        """Every page reachable by links from the home page, the index and the search page."""
        queue = ["index.html", "genindex.html", "search.html"]
        while queue:
            path = queue.pop()
            if path in self.pages or not (self.root / path).is_file():
                continue
            page = self.pages[path] = self.read(path)
            for href in page.links:
                target = self.local_path(urljoin(self.url(path), href))
                if target is not None and target.endswith(".html"):
                    queue.append(target)

    @property
    def content_pages(self) -> list[Page]:
        return [page for path, page in sorted(self.pages.items()) if path not in GENERATED]


def find_site() -> Path | None:
    site = os.environ.get("FIELD_GUIDE_SITE")
    root = Path(site) if site else ROOT / "docs" / "_build" / "html"
    return root if (root / "index.html").is_file() else None


# -- Serving it as a host would ----------------------------------------------------------------


def make_handler(site: Site):
    @functools.cache
    def gzipped(path: Path) -> bytes:
        return gzip.compress(path.read_bytes(), mtime=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            file = None
            if path.startswith(site.prefix) and ".." not in path.split("/"):
                file = site.root / path[len(site.prefix) :]
                if file.is_dir():
                    file = file / "index.html"
            status = 200
            if file is None or not file.is_file():
                status, file = 404, site.root / "404.html"
            content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            body = file.read_bytes()
            self.send_response(status)
            if content_type.startswith(COMPRESSED_TYPES) and "gzip" in self.headers.get(
                "Accept-Encoding", ""
            ):
                body = gzipped(file)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the test output quiet
            pass

    return Handler


@pytest.fixture(scope="session")
def site():
    """The built site, served on a free port of 127.0.0.1 for the whole session."""
    root = find_site()
    if root is None:
        unavailable(
            "no built site: run `nox -s tests`, or build docs/_build/html and set FIELD_GUIDE_SITE to it"
        )
    site = Site(root.resolve())
    canonical = site.read("index.html").canonical
    if canonical:
        site.prefix = urlsplit(canonical).path.rsplit("/", 1)[0] + "/"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(site))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    site.base_url = f"http://127.0.0.1:{server.server_address[1]}{site.prefix}"
    site.crawl()
    yield site
    server.shutdown()
    server.server_close()
    thread.join()


# -- The browser -------------------------------------------------------------------------------


def find_chromium() -> str | None:
    explicit = os.environ.get("FIELD_GUIDE_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="session")
def browser(site):
    chromium = find_chromium()
    if chromium is None:
        unavailable(
            "no Chromium found: install Debian's `chromium` package "
            "(or set FIELD_GUIDE_CHROMIUM to a Chrome or Chromium binary)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright is not installed: run `nox -s tests`, which installs the browser group")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def settle(page) -> None:
    """Wait until the page is finished: scripts run, MathJax typeset, web fonts loaded."""
    page.wait_for_load_state("load")
    page.evaluate(
        """async () => {
            if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
                await MathJax.startup.promise;
            }
            await document.fonts.ready;
        }"""
    )


@pytest.fixture(scope="session")
def load():
    """``load(page, url)``: go to a page and wait until it is finished, MathJax included."""

    def load(page, url):
        response = page.goto(url)
        settle(page)
        return response

    return load


# -- One visit to every page: what it asked for, what failed, what it weighed -------------------


@dataclass
class Visit:
    url: str
    status: int
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    math: int = 0  # equations in the page ...
    rendered_math: int = 0  # ... and how many of them MathJax rendered
    math_errors: int = 0
    transfer: int = 0  # bytes over the wire, compressed, headers included
    decoded: int = 0  # the same bodies uncompressed
    requests: int = 0
    accessibility: dict[str, list[str]] = field(default_factory=dict)  # theme -> serious problems


# -- Accessibility: axe-core, run in each visited page, in the light and the dark theme -----------

AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]  # WCAG 2.0 and 2.1, levels A and AA
BLOCKING = {"serious", "critical"}
# The dark theme changes colours and which figure variant shows, nothing else: its pass runs
# the rules those can break.
DARK_RULES = ["color-contrast", "link-in-text-block", "image-alt", "svg-img-alt"]


@functools.cache
def axe_script() -> str:
    """axe-core's script, as the axe-playwright-python package ships it."""
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text(encoding="utf-8")


def switch_theme(page, theme: str) -> None:
    """Put the loaded page in ``theme`` as a reader's choice would: the system preference and
    furo's own setting both say it, so everything that follows either (furo's colours, the
    figures' variants) is in it."""
    page.emulate_media(color_scheme=theme)
    page.evaluate(
        "(theme) => { localStorage.setItem('theme', theme); document.body.dataset.theme = theme; }", theme
    )


def axe_violations(page, run_only: dict) -> list[str]:
    """axe-core's serious and critical violations in the page as it is now."""
    page.evaluate(axe_script())
    results = page.evaluate(
        "(runOnly) => axe.run(document, {runOnly: runOnly, resultTypes: ['violations']})", run_only
    )
    return [
        f"{v['impact']} {v['id']}: {v['help']} at {json.dumps([n['target'] for n in v['nodes'][:3]])}"
        for v in results["violations"]
        if v["impact"] in BLOCKING
    ]


def check_accessibility(page) -> dict[str, list[str]]:
    """Every rule in the light theme, then the colour rules in the dark one."""
    found = {}
    for theme, run_only in (
        ("light", {"type": "tag", "values": AXE_TAGS}),
        ("dark", {"type": "rule", "values": DARK_RULES}),
    ):
        switch_theme(page, theme)
        assert page.evaluate("document.body.dataset.theme") == theme
        found[theme] = axe_violations(page, run_only)
    return found


def visit(browser, site: Site, url: str, missing: bool = False) -> Visit:
    """Load one page in a new context (an empty cache) with every outside request blocked.

    ``missing``: the address is one that does not exist, answered by the 404 page.
    """
    context = browser.new_context()
    page = context.new_page()
    result = Visit(url, status=0)

    def route(route):
        if site.local_path(route.request.url) is None and not route.request.url.startswith("data:"):
            result.outside_requests.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def console(message):
        if message.type == "error":
            location = message.location.get("url", "")
            if not (missing and location == url):  # the 404 page's own status
                result.console_errors.append(f"{message.text} ({location})")

    def response(response):
        if response.status >= 400 and not (missing and response.url == url):
            result.failed_requests.append(f"{response.status} {response.url}")

    page.route("**/*", route)
    page.on("console", console)
    page.on("pageerror", lambda error: result.console_errors.append(f"uncaught: {error}"))
    page.on(
        "requestfailed", lambda request: result.failed_requests.append(f"{request.failure} {request.url}")
    )
    page.on("response", response)
    result.status = page.goto(url).status
    settle(page)
    page.wait_for_load_state("networkidle")
    counts = page.evaluate(
        """() => {
            const math = [...document.querySelectorAll("span.math, div.math")];
            const entries = [...performance.getEntriesByType("navigation"),
                             ...performance.getEntriesByType("resource")];
            return {
                math: math.length,
                rendered: math.filter((m) => m.querySelector("mjx-container")).length,
                errors: document.querySelectorAll("mjx-merror").length,
                transfer: entries.reduce((sum, e) => sum + e.transferSize, 0),
                decoded: entries.reduce((sum, e) => sum + e.decodedBodySize, 0),
                requests: entries.length,
            };
        }"""
    )
    result.math, result.rendered_math, result.math_errors = (
        counts["math"],
        counts["rendered"],
        counts["errors"],
    )
    result.transfer, result.decoded, result.requests = (
        counts["transfer"],
        counts["decoded"],
        counts["requests"],
    )
    # The same loaded page, once measured, is checked for accessibility: loading and typesetting
    # a page cost more than axe itself, so no page is loaded twice for it.
    result.accessibility = check_accessibility(page)
    context.close()
    return result


@pytest.fixture(scope="session")
def visits(browser, site) -> dict[str, Visit]:
    """Every crawled page, and the 404 page at a missing address, each visited once."""
    results = {path: visit(browser, site, site.url(path)) for path in site.pages}
    results["404.html"] = visit(browser, site, site.url("no/such/page.html"), missing=True)
    write_weights(site, results)
    return results


# -- Page weight: written beside the site and summed up at the end of the run ------------------

WEIGHTS: dict[str, str] = {}


def write_weights(site: Site, visits: dict[str, Visit]) -> None:
    pages = {
        path: {"transfer_bytes": v.transfer, "uncompressed_bytes": v.decoded, "requests": v.requests}
        for path, v in sorted(visits.items())
    }
    transfer = [p["transfer_bytes"] for p in pages.values()]
    decoded = [p["uncompressed_bytes"] for p in pages.values()]
    heaviest = max(pages, key=lambda path: pages[path]["transfer_bytes"])
    summary = {
        "pages": len(pages),
        "median_transfer_bytes": statistics.median(transfer),
        "max_transfer_bytes": max(transfer),
        "heaviest_page": heaviest,
        "median_uncompressed_bytes": statistics.median(decoded),
        "max_uncompressed_bytes": max(decoded),
    }
    (site.root.parent / "page-weights.json").write_text(
        json.dumps({"summary": summary, "pages": pages}, indent=1)
    )
    kb = 1000
    WEIGHTS["line"] = (
        f"page weight, empty cache, {summary['pages']} pages: median {summary['median_transfer_bytes'] / kb:.0f} kB, "
        f"max {summary['max_transfer_bytes'] / kb:.0f} kB ({heaviest}) transferred gzip-compressed; "
        f"uncompressed median {summary['median_uncompressed_bytes'] / kb:.0f} kB, "
        f"max {summary['max_uncompressed_bytes'] / kb:.0f} kB; "
        f"per page in {site.root.parent / 'page-weights.json'}"
    )


def pytest_terminal_summary(terminalreporter):
    if WEIGHTS:
        terminalreporter.write_sep("-", "site weight")
        terminalreporter.write_line(WEIGHTS["line"])
