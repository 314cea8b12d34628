"""Every page in a real browser, offline: no errors, no failed request, equations rendered.

Each page is visited once (the ``visits`` fixture in conftest.py), in a fresh browser context
so that its cache is empty, with every request to anywhere but the local server blocked.
"""

import statistics

MB = 1_000_000


def test_every_page_loads_with_no_console_error_and_no_failed_request(visits):
    problems = {
        path: visit.console_errors + visit.failed_requests
        for path, visit in visits.items()
        if visit.console_errors or visit.failed_requests
    }
    assert problems == {}


def test_the_site_asks_for_nothing_from_outside(visits):
    """Fonts, scripts, styles and MathJax are all the site's own: it reads the same offline."""
    outside = {path: visit.outside_requests for path, visit in visits.items() if visit.outside_requests}
    assert outside == {}


def test_equations_render_with_every_outside_request_blocked(visits):
    with_math = {path: visit for path, visit in visits.items() if visit.math}
    # The guide explains techniques with their equations: no math at all means MathJax or the
    # dollarmath extension is off, not that there is nothing to check.
    assert with_math, "no page has an equation"
    unrendered = {
        path: f"{visit.rendered_math} of {visit.math} rendered, {visit.math_errors} errors"
        for path, visit in with_math.items()
        if visit.rendered_math != visit.math or visit.math_errors
    }
    assert unrendered == {}


def test_a_missing_address_answers_with_the_404_page(visits):
    visit = visits["404.html"]
    assert visit.status == 404
    assert visit.failed_requests == []  # its styles and scripts load from below any folder


def test_pages_are_light(visits):
    """The issue's goal: with an empty cache, the median page under 1 MB and none over 2.5 MB.

    Measured as transferred over the wire, compressed as GitHub Pages and Read the Docs
    compress; the figures per page are in docs/_build/page-weights.json.
    """
    weights = {path: visit.transfer for path, visit in visits.items()}
    assert statistics.median(weights.values()) < 1 * MB
    assert {path: weight for path, weight in weights.items() if weight > 2.5 * MB} == {}


def test_the_front_door_has_a_card_per_part_the_tutorial_first_and_no_contents_list(browser, site, load):
    """The index is a front door: one card per part of the sidebar, in its order, each to a
    page of that part; the tutorial's first; "get the code" one click away; and the
    table of contents left to the sidebar, not repeated in the page as a list of links."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    load(page, site.url("index.html"))
    found = page.evaluate(
        """() => {
            const content = document.querySelector("article[role=main]");
            const parts = [...document.querySelectorAll(".sidebar-tree p.caption")].map((caption) => ({
                name: caption.textContent.trim(),
                pages: [...caption.nextElementSibling.querySelectorAll("a")].map((a) => a.href),
            }));
            const cards = [...content.querySelectorAll(".sd-card")].map((card) => ({
                title: card.querySelector(".sd-card-title").textContent.trim(),
                href: card.querySelector("a.sd-stretched-link")?.href,
                text: card.querySelector(".sd-card-text")?.textContent.trim() || "",
            }));
            return {
                parts: parts,
                cards: cards,
                links: [...content.querySelectorAll("a")].map((a) => a.href),
                listed: content.querySelectorAll(".toctree-wrapper a").length,
            };
        }"""
    )
    context.close()
    parts, cards = found["parts"], found["cards"]
    assert len(parts) >= 5, parts  # the sidebar's parts: no captions would make the rest vacuous
    assert [card["title"] for card in cards] == [part["name"] for part in parts]
    assert [card["href"] in part["pages"] for card, part in zip(cards, parts, strict=True)] == [True] * len(
        parts
    )
    assert all(card["text"] for card in cards), cards  # each says what is in its part
    assert cards[0]["href"] == site.url("start-here/tutorial.html")
    assert site.url("get-the-code.html") in found["links"]
    assert found["listed"] == 0
