"""axe-core on every page, in the light and the dark theme: no serious or critical violation.

The rules are axe's WCAG 2.0 and 2.1 A and AA rules. axe-core's script comes with the
axe-playwright-python package.
"""

import json
from pathlib import Path

import pytest

TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
BLOCKING = {"serious", "critical"}
# The dark theme changes colours and which figure variant shows, nothing else: its pass runs
# the rules those can break.
DARK_RULES = ["color-contrast", "link-in-text-block", "image-alt", "svg-img-alt"]


@pytest.fixture(scope="session")
def axe_script() -> str:
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text(encoding="utf-8")


def violations(page, axe_script: str, run_only: dict) -> list[str]:
    page.evaluate(axe_script)
    results = page.evaluate(
        "(runOnly) => axe.run(document, {runOnly: runOnly, resultTypes: ['violations']})", run_only
    )
    return [
        f"{v['impact']} {v['id']}: {v['help']} at {json.dumps([n['target'] for n in v['nodes'][:3]])}"
        for v in results["violations"]
        if v["impact"] in BLOCKING
    ]


def switch_theme(page, theme: str) -> None:
    """Put the loaded page in ``theme`` as a reader's choice would: the system preference and
    furo's own setting both say it, so everything that follows either (furo's colours, the
    figures' variants) is in it."""
    page.emulate_media(color_scheme=theme)
    page.evaluate(
        "(theme) => { localStorage.setItem('theme', theme); document.body.dataset.theme = theme; }", theme
    )
    assert page.evaluate("document.body.dataset.theme") == theme


def test_no_serious_accessibility_violation_on_any_page_in_either_theme(browser, site, load, axe_script):
    # Each page is loaded once (loading and typesetting cost more than axe itself) and checked
    # in the light theme with every rule, then in the dark theme with the rules colours can break.
    context = browser.new_context(color_scheme="light")
    page = context.new_page()
    found = {}
    for path in [*site.pages, "no/such/page.html"]:
        load(page, site.url(path))
        for theme, run_only in (
            ("light", {"type": "tag", "values": TAGS}),
            ("dark", {"type": "rule", "values": DARK_RULES}),
        ):
            switch_theme(page, theme)
            if problems := violations(page, axe_script, run_only):
                found[f"{path} ({theme})"] = problems
    context.close()
    assert found == {}, json.dumps(found, indent=1)
