"""Every symbol in the site's math is listed, with its one meaning, on the notation page.

Letters used to do double duty across pages (alpha for LoRA's scale and a loss weight, T for the
sequence length and the teacher). docs/reference/notation.md gives each symbol one meaning, and
this test holds the pages to it: a symbol that an equation uses but the table does not list
fails, so a new symbol, or an old letter borrowed for something else, has to go through the table.
"""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"
NOTATION = DOCS / "reference" / "notation.md"

# A fenced block is code (which may hold "$" but no math) unless it is a directive holding
# Markdown, like {glossary} or a figure's caption; a {math} block is LaTeX. Unknown directives
# count as Markdown, so their math is checked rather than skipped.
FENCE = re.compile(r"^(`{3,})(.*)\n((?:.*\n)*?)\1[ \t]*$", re.MULTILINE)
CODE = ("{doctest}", "{literalinclude}", "{code-block}", "{code-cell}", "{eval-rst}", "{testcode}", "{math}")
INLINE_CODE = re.compile(r"(`+).+?\1", re.DOTALL)
# MyST's dollarmath: $$...$$, and $...$, which may wrap a line but not span a paragraph.
MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$])\$(?=\S)((?:[^$\n]|\n(?!\s*\n))+?)(?<=\S)\$(?!\d)", re.DOTALL)

GREEK = (  # every letter, so that an unlisted one cannot slip through as an unknown command
    "alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|pi|rho|"
    "sigma|tau|upsilon|phi|varphi|chi|psi|omega|ell|Gamma|Delta|Theta|Lambda|Xi|Pi|Sigma|Upsilon|Phi|Psi|Omega"
)
# Words, not symbols: \text{bytes}, \mathrm{softmax}, \operatorname{top-}, \mathbb{R}, \begin{cases}.
NAME = r"\\(?:text|mathrm|operatorname\*?|mathbb|begin|end)\{[^{}]*\}"
# A symbol is a latin or greek letter, maybe hatted or calligraphic, with its subscript if any.
LETTER = rf"\\(?:hat|mathcal)\s*\{{?\\?[A-Za-z]+\}}?|\\(?:{GREEK})(?![A-Za-z])|[A-Za-z]"
SUBSCRIPT = rf"\{{(?:[^{{}}]|\{{[^{{}}]*\}})*\}}|{NAME}|\\[A-Za-z]+|\w"
TOKEN = re.compile(rf"{NAME}|({LETTER})(?:_({SUBSCRIPT}))?|\\[A-Za-z]+")  # other commands: \log, \frac
# A subscript of these letters, or with a number or an operator in it (x_{t-1}, W_0), is an index
# and the symbol is the letter alone; any other (d_h, p_\theta, x_T, d_{\text{model}}) is part of a
# name, so that p_T for a teacher cannot pass as p.
INDEX = {"i", "j", "m", "t"}


def math_of(markdown: str) -> list[str]:
    """The LaTeX of every formula in a page, inline or display, outside code."""
    fenced = []

    def unfence(block: re.Match) -> str:
        info, body = block[2].strip(), block[3]
        if info.startswith("{math}"):
            fenced.append(re.sub(r"^:.*\n", "", body, flags=re.MULTILINE))  # without options (:label:)
        return FENCE.sub(unfence, body) if info.startswith("{") and not info.startswith(CODE) else ""

    prose = INLINE_CODE.sub("", FENCE.sub(unfence, markdown))
    return fenced + [m[1] or m[2] for m in MATH.finditer(prose)]


def symbols(tex: str) -> set[str]:
    """The symbols of a formula, named subscripts kept: d_{\\text{model}} is d_model, x_t is x."""
    found = set()
    for letter, sub in (m.groups() for m in TOKEN.finditer(tex)):
        if not letter:
            continue  # a name or a command
        symbol = re.sub(r"\\(hat|mathcal)\s*\{?(\\?\w+)\}?", r"\\\1{\2}", letter)  # \hat y is \hat{y}
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
    expected = {r"\mathcal{L}", r"\lambda", r"\tau", "p_teacher", r"\hat{y}", r"p_\theta", "x", "t"}
    assert symbols(tex) == expected
    tex = r"M_{ij} = \begin{cases} 0 & j \le i \end{cases}, W_0, H_{kv}"
    assert symbols(tex) == {"M", "i", "j", "W", "H_kv"}


def test_the_extractor_reads_math_in_prose_but_not_in_code():
    page = (
        "Width $d_{\\text{model}}$,\n$$\nd_h = 32\n$$ (eq-x)\n\n```{math}\n:label: eq-y\nr \\ll d\n```\n"
        "```{generated-figure} f\nCaption with $C$.\n```\n```python\ncost = '$5 $T'\n```\n`$k$`, not $\n\nx$."
    )
    assert math_of(page) == ["r \\ll d\n", "d_{\\text{model}}", "\nd_h = 32\n", "C"]
    assert len(DEFINED) > 50  # the table was found and read, so the check below is not vacuous


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda page: str(page.relative_to(DOCS)))
def test_every_symbol_is_in_the_notation_table(page):
    missing = {symbol for tex in math_of(page.read_text()) for symbol in symbols(tex)} - DEFINED
    assert not missing, f"{page.relative_to(DOCS)} uses symbols not in {NOTATION.name}: {sorted(missing)}"
