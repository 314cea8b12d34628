"""axe-core on every page, in the light and the dark theme: no serious or critical violation.

The rules are axe's WCAG 2.0 and 2.1 A and AA rules. axe-core's script comes with the
axe-playwright-python package.
"""

import json
from pathlib import Path

import pytest

TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
BLOCKING = {"serious", "critical"}


@pytest.fixture(scope="session")
def axe_script() -> str:
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text(encoding="utf-8")


def violations(page, axe_script: str) -> list[str]:
    page.evaluate(axe_script)
    results = page.evaluate(
        "(tags) => axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})",
        TAGS,
    )
    return [
        f"{v['impact']} {v['id']}: {v['help']} at {json.dumps([n['target'] for n in v['nodes'][:3]])}"
        for v in results["violations"]
        if v["impact"] in BLOCKING
    ]


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_no_serious_accessibility_violation_on_any_page(browser, site, load, axe_script, theme):
    # Both the reader's system preference and furo's own choice say the theme, so that
    # everything that follows either (furo's colours, the figures' variants) is in it.
    context = browser.new_context(color_scheme=theme)
    context.add_init_script(f"localStorage.setItem('theme', '{theme}')")
    page = context.new_page()
    found = {}
    for path in [*site.pages, "no/such/page.html"]:
        load(page, site.url(path))
        assert page.evaluate("document.body.dataset.theme") == theme
        if problems := violations(page, axe_script):
            found[path] = problems
    context.close()
    assert found == {}, json.dumps(found, indent=1)
