"""The NUMBER doctest flag (docs/_ext/numeric_doctest.py): a decimal matches within one unit of
its last printed digit, everything else as exactly as before, and only where the flag is set."""

import doctest
from decimal import Decimal
from io import StringIO

import pytest
from numeric_doctest import DECIMAL, NUMBER, NumericOutputChecker, last_digit
from sphinx.application import Sphinx

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE  # as the site's doctest_default_flags

# (expected, got): each passes with +NUMBER and fails without it.
WITHIN_PRECISION = [
    ("0.84", "0.8412"),
    ("0.84", "0.836"),
    ("0.84", "0.85"),  # one unit of the last digit is still within
    ("0.84", "0.83"),
    ("-0.37", "-0.36"),
    (".5", "0.45"),
    ("1.5e-03", "1.6e-03"),
    ("1.5e-03", "0.00141"),  # the same number written without an exponent
    (
        "6.20 -> 5.83 nats per token, change -0.37 (95% CI -0.39 to -0.35)",
        "6.21 -> 5.82 nats per token, change -0.38 (95% CI -0.40 to -0.34)",
    ),
    ("tensor([0.1235, 0.5678])", "tensor([0.1234, 0.5679])"),
    ("accuracy 0.84.", "accuracy 0.85."),  # a full stop after the number
    ("0.84 ... 0.10", "0.85 ... 0.11"),  # ELLIPSIS on text between the numbers
]

# (expected, got): each fails, with or without the flag.
BEYOND_PRECISION = [
    ("0.84", "0.86"),
    ("0.84", "0.82"),
    ("0.84", "0.8501"),  # just over one unit
    ("-0.37", "0.37"),
    ("1.5e-03", "1.7e-03"),
    ("1.50", "1.52"),  # a trailing zero is a printed digit: 1.50 allows 0.01, not 0.1
    ("0.84 and 0.10", "0.84 and 0.13"),  # one number too far fails the line
]

# (expected, got): only the decimals are read as numbers; the rest is text and stays exact.
EXACT_TEXT = [
    ("loss 0.84", "lass 0.84"),
    ("0.84 nats", "0.84 bits"),
    ("0.84, 0.85", "0.84; 0.85"),
    ("torch 2.13.0", "torch 2.13.1"),  # a version is not a decimal
    ("layer1.5", "layer1.6"),  # nor is a name's tail
    ("took 3.", "took 4."),  # nor an integer ending a sentence
    ("nan", "0.84"),
    ("0.84 and 0.10", "0.84"),  # not as many numbers: paired with nothing, compared as text
    ("0.84 ...", "0.85 and 0.9"),  # an ellipsis over numbers leaves them unpaired
]

# (expected, got): integers, counts and shapes are exact.
INTEGERS = [
    ("20", "21"),
    ("(20, True, 10)", "(20, True, 11)"),
    ("6738415616", "6738415617"),
    ("torch.Size([2, 4, 7, 16])", "torch.Size([2, 4, 7, 17])"),
    ("100", "100.4"),
]


def check(want: str, got: str, flags: int) -> bool:
    # doctest's own outputs end in a newline; so do these.
    return NumericOutputChecker().check_output(want + "\n", got + "\n", flags)


@pytest.mark.parametrize(("want", "got"), WITHIN_PRECISION)
def test_a_decimal_matches_within_its_last_printed_digit(want, got):
    assert check(want, got, FLAGS | NUMBER)


@pytest.mark.parametrize(("want", "got"), BEYOND_PRECISION)
def test_a_decimal_beyond_its_last_printed_digit_fails(want, got):
    assert not check(want, got, FLAGS | NUMBER)


@pytest.mark.parametrize(("want", "got"), EXACT_TEXT + INTEGERS)
def test_text_and_integers_stay_exact(want, got):
    assert not check(want, got, FLAGS | NUMBER)
    assert check(want, want, FLAGS | NUMBER)


@pytest.mark.parametrize(("want", "got"), WITHIN_PRECISION + BEYOND_PRECISION + EXACT_TEXT + INTEGERS)
def test_without_the_flag_the_checker_is_doctests_own(want, got):
    assert check(want, got, FLAGS) == doctest.OutputChecker().check_output(want + "\n", got + "\n", FLAGS)
    assert not check(want, got, FLAGS)


@pytest.mark.parametrize(
    ("text", "decimals"),
    [
        ("6.20 -> 5.83, change -0.37", ["6.20", "5.83", "-0.37"]),
        ("(.5, 1e-05, 2.5E+3, +0.1)", [".5", "1e-05", "2.5E+3", "+0.1"]),
        ("0.1-0.3", ["0.1", "0.3"]),  # a range: the dash is not a sign
        ("torch 2.13.0, layer1.5, took 3., 20 steps, nan", []),
    ],
)
def test_the_decimals_of_a_text(text, decimals):
    assert [m[0] for m in DECIMAL.finditer(text)] == decimals


@pytest.mark.parametrize(
    ("number", "unit"),
    [("0.84", "0.01"), ("1.50", "0.01"), (".5", "0.1"), ("1.5e-03", "0.0001"), ("2.5E+3", "100")],
)
def test_the_unit_of_the_last_digit(number, unit):
    assert last_digit(number) == Decimal(unit)


PAGE = """\
Numbers compared to their last printed digit.

.. doctest::

   >>> print(round(0.8412, 4))  # doctest: +NUMBER
   {inline}

.. doctest::
   :options: +NUMBER

   >>> print(0.836)
   {block}
"""


@pytest.mark.parametrize(
    ("inline", "block", "status"),
    [("0.84", "0.84", 0), ("0.86", "0.84", 1), ("0.84", "0.86", 1)],
)
def test_sphinxs_doctest_builder_uses_the_checker(tmp_path, monkeypatch, inline, block, status):
    """A real `sphinx-build -b doctest`: the flag works on a line and as a block's option."""
    # The builder replaces doctest's compile for the whole process; put it back afterwards.
    monkeypatch.setattr(doctest, "compile", compile, raising=False)
    (tmp_path / "conf.py").write_text('extensions = ["numeric_doctest"]\n')
    (tmp_path / "index.rst").write_text(PAGE.format(inline=inline, block=block))
    out, doctrees = tmp_path / "_build", tmp_path / "_doctrees"
    app = Sphinx(tmp_path, tmp_path, out, doctrees, "doctest", status=StringIO(), warning=StringIO())
    app.build()
    assert app.statuscode == status, (out / "output.txt").read_text()


# -- TIMING: a clock's numbers, within a factor of three ---------------------------------------


@pytest.mark.parametrize(
    ("want", "got", "passes"),
    [
        ("0.020 s per step, 51000 tokens per second", "0.031 s per step, 30000 tokens per second", True),
        ("0.020 s per step", "0.0067 s per step", True),  # a third of it is still within
        ("0.020 s per step", "0.061 s per step", False),  # over three times
        ("0.020 s per step", "0.0060 s per step", False),  # under a third
        ("51000 tokens per second", "0 tokens per second", False),  # a clock never reads zero
        ("0.020 s per step", "0.020 s per stop", False),  # the words still match exactly
        ("0.020 s, 0.030 s", "0.020 s", False),  # as many numbers, or compared exactly
        ("13,793 tokens per second", "14,050 tokens per second", True),  # one number, not 13 and 793
        ("13,793 tokens per second", "5,300 tokens per second", True),
        ("13,793 tokens per second", "4,500 tokens per second", False),  # under a third
        ("13,793 tokens per second", "9,990 tokens per second", True),
        ("1,700,416 bytes", "5,200,000 bytes", False),
        ("18.0 ms, 21,152 tokens", "25.1 ms, 15,002 tokens", True),
    ],
)
def test_timing_matches_within_a_factor_of_three(want, got, passes):
    from numeric_doctest import TIMING

    checker = NumericOutputChecker()
    assert checker.check_output(want + "\n", got + "\n", FLAGS | TIMING) is passes
    assert not checker.check_output(want + "\n", got + "\n", FLAGS) or want == got
