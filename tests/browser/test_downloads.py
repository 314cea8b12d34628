"""The download links of docs/_ext/downloads.py, as a reader meets them: on every page with
doctests, right under the title, both visible in the light and the dark theme, each naming a
file the site serves (a notebook that opens, a script that compiles); on every other page, none.
Their contrast is axe's to check, in both themes (test_accessibility.py)."""

import json
import re
from pathlib import Path

import fieldguide

DOCS = Path(__file__).parents[2] / "docs"
LABELS = {"Download notebook": ".ipynb", "Download Python script": ".py"}


def has_doctests(path: Path) -> bool:
    return re.search(r"^\s*(```|:::)\{(doctest|testcode)\}", path.read_text(), flags=re.MULTILINE) is not None


def check_file(context, url: str, suffix: str) -> str | None:
    """What is wrong with the file at ``url``, or None."""
    response = context.request.get(url)
    if response.status != 200:
        return f"{url}: HTTP {response.status}"
    text = response.text()
    if suffix == ".ipynb":
        book = json.loads(text)
        first = "".join(book["cells"][0]["source"]) if book["nbformat"] == 4 else ""
        if not first.startswith(f'%pip install "llm-finetuning-guide[examples]=={fieldguide.__version__}"'):
            return f"{url}: not a notebook whose first cell installs this version of the lab"
    else:
        compile(text, url, "exec")
    return None


def test_every_page_with_doctests_offers_both_downloads_and_no_other_page_does(browser, site, load):
    context = browser.new_context()
    page = context.new_page()
    expected, offered, problems = {}, {}, []
    for entry in site.content_pages:
        source = DOCS / Path(entry.path).with_suffix(".md")
        expected[entry.path] = source.is_file() and has_doctests(source)
        load(page, site.url(entry.path))
        offered[entry.path] = False
        for label, suffix in LABELS.items():
            link = page.get_by_role("link", name=label, exact=True)
            if link.count() == 0:
                continue
            offered[entry.path] = True
            if link.count() != 1 or link.get_attribute("download") is None:
                problems.append(f"{entry.path}: {link.count()} '{label}' links, or one without `download`")
                continue
            if link.evaluate("a => a.parentElement.previousElementSibling?.tagName") != "H1":
                problems.append(f"{entry.path}: '{label}' is not right under the title")
            for theme in ("light", "dark"):
                page.emulate_media(color_scheme=theme)
                page.evaluate("(theme) => { document.body.dataset.theme = theme; }", theme)
                if not link.is_visible():
                    problems.append(f"{entry.path}: '{label}' is hidden in the {theme} theme")
            href = link.evaluate("a => a.href")
            if not href.endswith(suffix):
                problems.append(f"{entry.path}: '{label}' links to {href}")
            elif problem := check_file(context, href, suffix):
                problems.append(problem)
    context.close()
    assert any(expected.values()), "no page has doctests: the check below would prove nothing"
    assert offered == expected
    assert problems == []
