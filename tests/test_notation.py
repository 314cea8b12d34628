"""Every symbol in the site's math is listed, with its one meaning, on the notation page.

Letters used to do double duty across pages (alpha for LoRA's scale and a loss weight, T for the
sequence length and the teacher). docs/reference/notation.md gives each symbol one meaning, and
this test holds the pages to it: a symbol that an equation uses but the table does not list
fails, so a new symbol, or an old letter borrowed for something else, has to go through the table.
The math is found by MyST's own parser, so what is checked is what the site renders as math; an
upright name (\\mathrm{SE}) and a labelled matrix (W^O) count as symbols, so neither can hide one.
"""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from markdown_it.renderer import RendererHTML
from myst_parser.config.main import MdParserConfig
from myst_parser.parsers.mdit import create_md_parser

DOCS = Path(__file__).parents[1] / "docs"
NOTATION = DOCS / "reference" / "notation.md"


def site_parser():
    """MyST's own Markdown parser, with the myst_* settings of docs/conf.py (read, not imported:
    importing conf.py builds inventories). What it reads as math is what the site renders."""
    fields = {field.name for field in dataclasses.fields(MdParserConfig)}
    settings = {}
    for node in ast.parse((DOCS / "conf.py").read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        name = target.id if isinstance(target, ast.Name) else ""
        if name.startswith("myst_") and name.removeprefix("myst_") in fields:
            settings[name.removeprefix("myst_")] = ast.literal_eval(node.value)
    return create_md_parser(MdParserConfig(**settings), RendererHTML)


MARKDOWN = site_parser()
MATH_TOKENS = {"math_inline", "math_inline_double", "math_block", "math_block_label", "amsmath"}
# A directive's body is Markdown (a {dropdown}, a figure's caption, the {glossary}), parsed again
# for its math, unless the directive holds code; a {math} directive is LaTeX. Unknown directives
# count as Markdown, so their math is checked rather than skipped.
CODE = ("{doctest}", "{literalinclude}", "{code-block}", "{code-cell}", "{eval-rst}", "{testcode}")
OPTIONS = re.compile(r"\A(?::[\w-]+:.*\n)+")  # a directive's options (:label:, :alt:) before its body

GREEK = (  # every letter, so that an unlisted one cannot slip through as an unknown command
    "alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|pi|rho|"
    "sigma|tau|upsilon|phi|varphi|chi|psi|omega|ell|Gamma|Delta|Theta|Lambda|Xi|Pi|Sigma|Upsilon|Phi|Psi|Omega"
)
# Words, not symbols: \text{bytes}, \operatorname*{arg\,max} (LaTeX's way to write an operator,
# like \log), \begin{cases}. An upright name of the site's own, \mathrm{softmax} or \mathrm{SE},
# is a symbol like a letter, and so is a blackboard letter such as \mathbb{R}.
NAME = r"\\(?:text|operatorname\*?|begin|end)\{[^{}]*\}"
# A symbol is a latin or greek letter, maybe hatted or calligraphic, or an upright name, with its
# subscript if any, and with a superscript that labels it (W^Q, h^{\text{next}}) if any.
DECORATED = r"\\(?:hat|mathcal)\s*\{?\\?[A-Za-z]+\}?|\\(?:mathrm|mathbb)\{[^{}]*\}"  # \hat{y}, \mathrm{SE}
LETTER = rf"{DECORATED}|\\(?:{GREEK})(?![A-Za-z])|[A-Za-z]"
SUBSCRIPT = rf"\{{(?:[^{{}}]|\{{[^{{}}]*\}})*\}}|{NAME}|\\[A-Za-z]+|\w"
# A single capital letter or a \text name as a superscript is a label (W^Q, W^O); anything else
# there (a power, a layer (l), a transpose, the temperature of p^\tau) is read for its own symbols.
LABEL = rf"[A-Z](?![A-Za-z])|\{{[A-Z]\}}|\{{?{NAME}\}}?"
# Any other command (\log, \frac) is neither.
TOKEN = re.compile(rf"{NAME}|({LETTER})(?:_({SUBSCRIPT}))?(?:\^({LABEL}))?|\\[A-Za-z]+")
# A subscript of these letters, or with a number or an operator in it (x_{t-1}, W_0), is an index
# and the symbol is the letter alone; any other (d_h, p_\theta, x_T, d_{\text{model}}) is part of a
# name, so that p_T for a teacher cannot pass as p.
INDEX = {"i", "j", "m", "t"}


def math_of(markdown: str) -> list[str]:
    """The LaTeX of every formula in a page, inline or display, outside code, as MyST reads it."""
    found = []
    tokens = MARKDOWN.parse(markdown)
    while tokens:
        token = tokens.pop(0)
        tokens[:0] = token.children or []
        info = token.info.strip()
        if token.type in MATH_TOKENS:
            found.append(token.content)
        elif token.type in ("fence", "colon_fence") and info.startswith("{math}"):
            found.append(OPTIONS.sub("", token.content))
        elif token.type in ("fence", "colon_fence") and info.startswith("{") and not info.startswith(CODE):
            found += math_of(OPTIONS.sub("", token.content))
    return found


def symbols(tex: str) -> set[str]:
    """The symbols of a formula, named subscripts kept: d_{\\text{model}} is d_model, x_t is x."""
    found = set()
    for letter, sub, label in (m.groups() for m in TOKEN.finditer(tex)):
        if not letter:
            continue  # a name or a command
        symbol = re.sub(r"\\(hat|mathcal)\s*\{?(\\?\w+)\}?", r"\\\1{\2}", letter)  # \hat y is \hat{y}
        if label and symbol.startswith("\\mathbb"):
            found |= symbols(label)  # the exponent of a space, as in R^V: V is the vocabulary size
        elif label:
            symbol += "^" + re.sub(r"\\(?:text|mathrm)\{(.*?)\}|[{}]", r"\1", label)
        inner = symbols(sub or "")
        named = re.fullmatch(r"\{?\\?[A-Za-z]+\}?", sub or "") and not inner <= INDEX
        if sub and (named or re.search(NAME, sub)):
            found.add(symbol + "_" + re.sub(r"\\(?:text|mathrm)\{(.*?)\}|[{}]", r"\1", sub))
        else:
            found |= {symbol} | inner
    return found


# Where a symbol is defined: the first column of the table, one row per line.
ROWS = re.findall(r"^\| *(.+?) *\|", NOTATION.read_text(), re.MULTILINE)
DEFINED = {symbol for cell in ROWS for tex in math_of(cell) for symbol in symbols(tex)}


def test_the_extractor_finds_the_symbols_of_an_equation():
    tex = r"\mathcal{L} = \lambda \tau^2 \mathrm{KL}(p_{\text{teacher}}^{\tau} \| \hat y) - \log p_\theta(x_{t-1}) / 10^3"
    expected = {r"\mathcal{L}", r"\lambda", r"\tau", r"\mathrm{KL}", "p_teacher", r"\hat{y}", r"p_\theta"}
    assert symbols(tex) == expected | {"x", "t"}
    tex = r"M_{ij} = \begin{cases} 0 & j \le i \end{cases}, W_0, H_{kv}, \operatorname*{arg\,max}_{c} \mathrm{acc}_{\text{pref}}"
    assert symbols(tex) == {"M", "i", "j", "W", "H_kv", "c", r"\mathrm{acc}_pref"}


def test_a_superscript_that_labels_a_symbol_is_part_of_it():
    # W^O names the output projection: it must not make a bare O pass as defined. A power, a layer
    # index, a transpose or the temperature in p^tau is not a label, and neither is R^V's exponent.
    tex = r"W_i^Q, W^O, h^{\text{next}}, h_t^{(l)}, K^\top, \tau^2, p_{\text{student}}^{\tau}"
    assert symbols(tex) == {"W^Q", "i", "W^O", "h^next", "h", "t", "l", "K", r"\tau", "p_student"}
    spaces = r"E \in \mathbb{R}^{V \times d_h}, z_t \in \mathbb{R}^V"
    assert symbols(spaces) == {"E", r"\mathbb{R}", "V", "d_h", "z", "t"}


def test_the_extractor_reads_math_as_myst_does_in_prose_but_not_in_code():
    page = (
        "Width $d_{\\text{model}}$, and $ x $ with spaces, as MyST allows.\n\n$$\nd_h = 32\n$$ (eq-x)\n\n"
        "```{math}\n:label: eq-y\nr \\ll d\n```\n\n"
        "```{generated-figure} f\n:alt: text\n\nCaption with $C$.\n```\n\n"
        "1. An exercise.\n\n   :::{dropdown} Solution\n   It is $k$.\n   :::\n\n"
        "```python\ncost = '$5 $T'\n```\n\n`$y$` is code, and so is\n\n```{doctest}\n>>> '$z$'\n```\n"
    )
    assert math_of(page) == ["d_{\\text{model}}", " x ", "\nd_h = 32\n", "r \\ll d\n", "C", "k"]
    assert len(DEFINED) > 50  # the table was found and read, so the check below is not vacuous


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda page: str(page.relative_to(DOCS)))
def test_every_symbol_is_in_the_notation_table(page):
    missing = {symbol for tex in math_of(page.read_text()) for symbol in symbols(tex)} - DEFINED
    assert not missing, f"{page.relative_to(DOCS)} uses symbols not in {NOTATION.name}: {sorted(missing)}"


# Delimiters that come in pairs. A lost \rVert once turned into a line break and a stray
# "Vert", whose letters V, e, r and t are all defined symbols, so the check above passed.
PAIRS = [(r"\lVert", r"\rVert"), (r"\left", r"\right"), (r"\lvert", r"\rvert"), ("{", "}")]


def count(tex: str, delimiter: str) -> int:
    """How often ``delimiter`` occurs as itself: \\left, not the start of \\leftarrow."""
    return len(re.findall(re.escape(delimiter) + (r"(?![A-Za-z])" if delimiter[-1].isalpha() else ""), tex))


def unpaired(tex: str) -> list[str]:
    """The opening delimiters of ``tex`` whose closing ones are not as many."""
    return [opening for opening, closing in PAIRS if count(tex, opening) != count(tex, closing)]


def test_the_pair_check_finds_a_lost_closing_delimiter():
    assert unpaired(r"\lVert W \rVert + \left( x \right) \leftarrow y") == []
    assert unpaired("\\lVert W_0 \nVert") == [r"\lVert"]
    assert unpaired(r"\frac{a}{b") == ["{"]


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda page: str(page.relative_to(DOCS)))
def test_every_delimiter_in_the_math_is_closed(page):
    broken = {tex: unpaired(tex) for tex in math_of(page.read_text()) if unpaired(tex)}
    assert not broken, f"{page.relative_to(DOCS)}: unclosed {broken}"
