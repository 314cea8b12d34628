"""What a reader clicks: the light/dark theme toggle and the copy button of a code block."""

import re

# The site's copybutton_prompt_text (docs/conf.py): a doctest copies as the code to paste,
# without its prompts and without the output lines.
PROMPT = re.compile(r"^(>>> |\.\.\. |\$ )(.*)")


def expected_copy(text: str) -> str:
    """What sphinx-copybutton puts on the clipboard for a block's text, with our settings."""
    lines = text.split("\n")
    if any(PROMPT.match(line) for line in lines):
        kept = [line for line in lines if PROMPT.match(line) or not line.strip()]
        lines = [PROMPT.match(line).group(2) if PROMPT.match(line) else line for line in kept]
    return "\n".join(lines).removesuffix("\n")


def test_expected_copy_drops_prompts_and_output():
    assert expected_copy(">>> x = 1\n>>> print(x)\n1\n") == "x = 1\nprint(x)"
    assert expected_copy("pip install nox\n") == "pip install nox"


def test_the_theme_toggle_switches_between_light_and_dark(browser, site, load):
    context = browser.new_context(color_scheme="light")
    page = context.new_page()
    load(page, site.url("index.html"))
    toggle = page.locator(".theme-toggle").filter(visible=True).first
    backgrounds = {}
    for _ in range(3):  # furo cycles auto -> dark -> light -> auto
        toggle.click()
        theme = page.evaluate("document.body.dataset.theme")
        backgrounds[theme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
    context.close()
    assert {"light", "dark"} <= set(backgrounds)
    assert backgrounds["light"] != backgrounds["dark"]


def test_the_copy_button_copies_a_code_block(browser, site, load):
    pages = [page for page in site.content_pages if 'class="highlight' in (site.root / page.path).read_text()]
    assert pages, "no page shows a code block"
    # Prefer a page with a doctest, to check that the prompts are left out.
    page_path = next(
        (p.path for p in pages if 'class="gp"' in (site.root / p.path).read_text()), pages[0].path
    )
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    load(page, site.url(page_path))
    blocks = page.locator("div.highlight")
    with_prompt = page.locator("div.highlight:has(.gp)")
    checked = 0
    for block in [blocks.first, *([with_prompt.first] if with_prompt.count() else [])]:
        text = block.locator("pre").inner_text()
        block.hover()
        block.locator(".copybtn").click()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied == expected_copy(text), page_path
        checked += 1
    context.close()
    assert checked
