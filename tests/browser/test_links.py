"""A crawl of the built site: links and anchors, the sitemap, and what every page carries."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urljoin, urlsplit

CONF = Path(__file__).parents[2] / "docs" / "conf.py"
REPOSITORY = re.search(r'^REPOSITORY = "(.+)"$', CONF.read_text(), flags=re.MULTILINE).group(1)


def all_pages(site):
    """Every crawled page, and the 404 page, which no page links to."""
    return {**site.pages, "404.html": site.read("404.html")}


def test_no_broken_internal_link_and_no_missing_anchor(site):
    broken = []
    for path, page in all_pages(site).items():
        for href in page.links:
            url = urljoin(site.url(path), href)
            target = site.local_path(url)
            if target is None:
                continue  # another site: `nox -s linkcheck` checks those
            file = site.root / target
            if file.is_dir():
                target, file = f"{target.rstrip('/')}/index.html".lstrip("/"), file / "index.html"
            if not file.is_file():
                broken.append(f"{path}: {href} (no such file)")
                continue
            anchor = urlsplit(url).fragment
            if anchor and target.endswith(".html") and anchor not in site.read(target).ids:
                broken.append(f"{path}: {href} (no such anchor)")
    assert broken == []


def test_the_crawl_finds_every_page_of_the_sitemap(site):
    """sitemap.xml lists exactly the pages a reader can reach, at their published address."""
    namespace = {"s": "http://www.sitemaps.org/schemas/sitemap/0.9"}
    locations = [
        loc.text for loc in ET.parse(site.root / "sitemap.xml").getroot().findall("s:url/s:loc", namespace)
    ]
    base = site.read("index.html").canonical.rsplit("/", 1)[0] + "/"
    assert all(location.startswith(base) for location in locations)
    assert sorted(location[len(base) :] for location in locations) == sorted(
        page.path for page in site.content_pages
    )


def test_every_page_links_the_repository(site):
    missing = [path for path, page in all_pages(site).items() if REPOSITORY not in page.links]
    assert missing == []


def test_every_page_written_from_a_source_can_be_edited(site):
    """Furo's "edit this page" link points at the page's own source file on main."""
    missing = []
    for page in site.content_pages:
        stem = page.path.removesuffix(".html")
        edit = f"{REPOSITORY}/edit/main/docs/{stem}."
        if not any(link.startswith(edit) for link in page.links):
            missing.append(page.path)
    assert missing == []


def test_every_page_has_a_link_preview(site):
    """OpenGraph tags, which chat apps and social sites read to preview a shared link."""
    needed = {"og:title", "og:type", "og:url", "og:description"}
    missing = {
        page.path: sorted(needed - {k for k, v in page.meta.items() if v})
        for page in site.content_pages
        if needed - {k for k, v in page.meta.items() if v}
    }
    assert missing == {}


def test_every_page_has_a_favicon(site):
    missing = [
        path
        for path in all_pages(site)
        if 'rel="icon"' not in (site.root / path).read_text()
        and 'rel="shortcut icon"' not in (site.root / path).read_text()
    ]
    assert missing == []
