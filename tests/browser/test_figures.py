"""Every figure readable at the size it is shown, in the light and the dark theme.

Each page is loaded once in a window 1280 px wide, then looked at in each theme. A figure is
an image (or an inline SVG with text) in the page's content. The site's figures are SVG with
their text kept as text (docs/_ext/generated_figures.py), so the browser measures it: the SVG
is laid out at the size the figure is shown, and each ``<text>`` element's font size is
multiplied by the scale from its drawing's units to the screen. That is what a reader sees,
with no figure-specific metadata to trust. A raster figure's text cannot be measured that
way, so one fails the test, saying why.

The same visit checks that no code block scrolls sideways at that width: a doctest's output
that runs past the column hides the number the reader came for.
"""

import json
from dataclasses import dataclass, field

import pytest

WIDTH, HEIGHT = 1280, 900  # a laptop's window
THEMES = ("light", "dark")
MIN_TEXT_PX = 10  # the smallest text a figure may show, in CSS pixels as rendered
MIN_TEXT_CONTRAST = 4.5  # WCAG AA for normal text, against the page behind the figure
MIN_INK = 0.01  # the share of a figure's area that must stand out from the page (contrast >= 3)

# Runs in the page. For every visible figure in the content: where it comes from, the size it
# is shown at, its smallest text in CSS pixels and that text's contrast with the page, and
# how much of it stands out from the page at all. Figures with text hidden by the theme (the
# other theme's variant) are skipped: display: none gives them no box.
MEASURE = """
async () => {
    const content = document.querySelector("article[role=main]");
    const rgb = (colour) => colour.match(/[\\d.]+/g).map(Number);
    const luminance = ([r, g, b]) => {
        const linear = (c) => (c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
        return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b);
    };
    const contrast = (a, b) => {
        const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
        return (hi + 0.05) / (lo + 0.05);
    };
    // What shows through a transparent figure: the first ancestor with a background.
    const behind = (element) => {
        for (let e = element; e; e = e.parentElement) {
            const colour = rgb(getComputedStyle(e).backgroundColor);
            if (colour.length < 4 || colour[3] > 0) return colour.slice(0, 3);
        }
        return [255, 255, 255];
    };
    const shown = (e) => e.getBoundingClientRect().width > 0 && e.getBoundingClientRect().height > 0;
    // Each text's size on screen: its font size in the drawing's units, times the scale of
    // its transform to the screen (rotation included).
    const texts = (svg, page) => [...svg.querySelectorAll("text, tspan")]
        .filter((t) => t.textContent.trim())
        .map((t) => {
            const m = t.getScreenCTM();
            return {
                text: t.textContent.trim(),
                px: parseFloat(getComputedStyle(t).fontSize) * Math.hypot(m.a, m.b),
                contrast: contrast(rgb(getComputedStyle(t).fill), page),
            };
        });
    // How much of the figure, drawn over the page's colour, stands out from it.
    const ink = (image, width, height, page) => {
        const canvas = document.createElement("canvas");
        canvas.width = Math.round(width);
        canvas.height = Math.round(height);
        const context = canvas.getContext("2d");
        context.fillStyle = `rgb(${page.join(",")})`;
        context.fillRect(0, 0, canvas.width, canvas.height);
        context.drawImage(image, 0, 0, canvas.width, canvas.height);
        const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let standing = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (contrast([data[i], data[i + 1], data[i + 2]], page) >= 3) standing += 1;
        }
        return standing / (data.length / 4);
    };
    const figures = [];
    for (const image of content.querySelectorAll("img")) {
        if (!shown(image)) continue;
        await image.decode();
        const box = image.getBoundingClientRect();
        const page = behind(image.parentElement);
        const figure = {
            src: image.getAttribute("src"), width: box.width, height: box.height,
            natural_width: image.naturalWidth, ink: ink(image, box.width, box.height, page),
            svg: /\\.svg($|[?#])/.test(image.currentSrc), texts: [],
        };
        if (figure.svg) {
            // Lay the file's own SVG out at the size the image is shown, off screen, and measure.
            const source = await (await fetch(image.currentSrc)).text();
            const svg = new DOMParser().parseFromString(source, "image/svg+xml").documentElement;
            const holder = document.createElement("div");
            holder.style.cssText = "position: absolute; left: -20000px; top: 0";
            holder.appendChild(document.importNode(svg, true));
            document.body.appendChild(holder);
            const placed = holder.firstElementChild;
            placed.setAttribute("width", box.width);
            placed.setAttribute("height", box.height);
            figure.texts = texts(placed, page);
            holder.remove();
        }
        figures.push(figure);
    }
    for (const svg of content.querySelectorAll("svg")) {
        if (!shown(svg) || !svg.querySelector("text")) continue;  // icons have no text
        const box = svg.getBoundingClientRect();
        figures.push({
            src: "inline <svg>", width: box.width, height: box.height, natural_width: null,
            ink: null, svg: true, texts: texts(svg, behind(svg)),
        });
    }
    const overflowing = [...content.querySelectorAll("pre")]
        .filter((pre) => shown(pre) && pre.scrollWidth > pre.clientWidth + 1)
        .map((pre) => ({
            overflow_px: pre.scrollWidth - pre.clientWidth,
            longest_line: pre.textContent.split("\\n").reduce((a, b) => (b.length > a.length ? b : a), ""),
        }));
    return {figures: figures, overflowing: overflowing};
}
"""


@dataclass
class Look:
    """One page, as measured in one theme."""

    figures: list[dict] = field(default_factory=list)
    overflowing: list[dict] = field(default_factory=list)


def show_theme(page, theme: str) -> None:
    """The reader's choice of theme, as conftest.py's ``switch_theme`` makes it."""
    page.emulate_media(color_scheme=theme)
    page.evaluate(
        "(theme) => { localStorage.setItem('theme', theme); document.body.dataset.theme = theme; }", theme
    )


@pytest.fixture(scope="module")
def looks(browser, site, load) -> dict[tuple[str, str], Look]:
    """(page, theme) -> what MEASURE found, for every page of the site."""
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = context.new_page()
    found = {}
    for path in (page_.path for page_ in site.content_pages):
        load(page, site.url(path))
        for theme in THEMES:
            show_theme(page, theme)
            found[path, theme] = Look(**page.evaluate(MEASURE))
    context.close()
    return found


def smallest_text(figure: dict) -> dict | None:
    return min(figure["texts"], key=lambda t: t["px"], default=None)


def test_the_site_has_figures_to_check(looks):
    """No figure at all would mean the selector or the figure directive broke, not success."""
    counts = {
        theme: sum(len(look.figures) for (_, t), look in looks.items() if t == theme) for theme in THEMES
    }
    assert all(count >= 5 for count in counts.values()), counts


def test_every_figure_is_svg_so_that_its_text_can_be_measured(looks):
    raster = {
        f"{path} ({theme})": f["src"]
        for (path, theme), look in looks.items()
        for f in look.figures
        if not f["svg"]
    }
    assert raster == {}, "draw figures as SVG with text kept as text (generated-figure does)"


def figures_where(looks, problem) -> dict[str, str]:
    """What ``problem(figure)`` says is wrong, for each figure on each page in each theme
    where it says anything."""
    return {
        f"{path} ({theme}) {figure['src']}": message
        for (path, theme), look in looks.items()
        for figure in look.figures
        if (message := problem(figure))
    }


def too_small(figure) -> str | None:
    text = smallest_text(figure)
    if text is None or text["px"] >= MIN_TEXT_PX:
        return None
    return f"{text['px']:.1f} px: {text['text']!r} (shown {figure['width']:.0f} px wide)"


def too_faint(figure) -> str | None:
    text = min(figure["texts"], key=lambda t: t["contrast"], default=None)
    if text is None or text["contrast"] >= MIN_TEXT_CONTRAST:
        return None
    return f"contrast {text['contrast']:.1f}: {text['text']!r}"


def blank(figure) -> str | None:
    if figure["ink"] is None or figure["ink"] >= MIN_INK:
        return None
    return f"{figure['ink']:.2%} of it stands out"


def test_every_figure_text_renders_at_10_px_or_more_in_both_themes(looks):
    small = figures_where(looks, too_small)
    assert small == {}, json.dumps(small, indent=1)


def test_every_figure_text_stands_out_from_the_page_in_both_themes(looks):
    faint = figures_where(looks, too_faint)
    assert faint == {}, json.dumps(faint, indent=1)


def test_no_figure_is_blank_against_the_page_in_either_theme(looks):
    blanks = figures_where(looks, blank)
    assert blanks == {}, json.dumps(blanks, indent=1)


def test_no_code_block_scrolls_sideways_at_1280_px(looks):
    # Wrapping does not depend on the theme: the light look is enough.
    overflowing = {
        path: look.overflowing
        for (path, theme), look in looks.items()
        if theme == "light" and look.overflowing
    }
    assert overflowing == {}, json.dumps(overflowing, indent=1)
