"""A doctest flag, ``NUMBER``, that compares each printed decimal to its last written digit.

A score computed on one CPU can end in a different last digit on another, because the
hardware adds floats in a different order. A page marks such a line ``# doctest: +NUMBER``
and says in its prose that its numbers are compared to their last printed digit. Then each
decimal in the expected output (one with a point or an exponent: ``0.84``, ``-0.37``,
``1.5e-03``) matches any number in the same place of the output that is within one unit of
that last digit: ``0.84`` matches ``0.83`` to ``0.85`` (so ``0.8412`` and ``0.836``), and not
``0.86``; ``1.5e-03`` allows 0.0001 either way. The tolerance is always the one the page
prints, so a figure that needs a wider one is printed with fewer digits. Integers, and every
other character, must match as before. The idea is pytest's ``NUMBER`` option; this is
written for the site, with exact decimal arithmetic instead of floats.

The numbers of the expected output and of the actual output are paired in order, so they
must be as many: where an ellipsis hides some of them, the line is compared exactly.

A second flag, ``TIMING``, is for what a clock measures: seconds per step, tokens per second.
Those change with the machine and with what else it runs, by far more than a last digit, so
each number (integer or decimal) matches any positive number within a factor of
``TIMING_FACTOR`` of it. A page that uses it says so; it shows the size of a cost and the
ratio between two, not their digits.
"""

import doctest
import re
from decimal import Decimal

import sphinx.ext.doctest

NUMBER = doctest.register_optionflag("NUMBER")
TIMING = doctest.register_optionflag("TIMING")
TIMING_FACTOR = 3  # a timed number matches anything from a third of it to three times it

# A decimal as Python prints one: digits with a point and at least one digit after it, or an
# exponent, or both. It must stand alone: the 13 of a version (2.13.0), of a name (x1.5) or
# of a longer number is not one, and neither is the 3 that ends the sentence "took 3.".
DECIMAL = re.compile(
    r"""
    (?<![\w.])                          # not the tail of a word, a version or another number
    [+-]?
    (?: \d*\.\d+ (?:[eE][+-]?\d+)?      # 0.84, .5, 1.5e-03
      | \d+ [eE][+-]?\d+ )              # 1e-05
    (?!\.?\d)                           # not the head of a version or a longer number
    """,
    re.VERBOSE,
)


def last_digit(number: str) -> Decimal:
    """One unit of the last digit written: 0.01 for 0.84, 0.0001 for 1.5e-03."""
    return Decimal(1).scaleb(Decimal(number).as_tuple().exponent)


def _decimal(text: str) -> Decimal:
    """A number as printed, thousands separators and all, as a ``Decimal``."""
    return Decimal(text.replace(",", ""))


def _rewrite_close(want: str, got: str, pattern: re.Pattern, close) -> str:
    """``got``, with each number ``pattern`` finds written as ``want``'s where ``close(want, got)``.

    What is left to compare is then the text around the numbers, and the numbers too far off.
    Numbers pair in order, so a different count leaves ``got`` as it is.
    """
    wanted, found = list(pattern.finditer(want)), list(pattern.finditer(got))
    if len(wanted) != len(found):
        return got
    pieces, end = [], 0
    for w, g in zip(wanted, found, strict=True):
        pieces += [got[end : g.start()], w[0] if close(_decimal(w[0]), _decimal(g[0]), w[0]) else g[0]]
        end = g.end()
    return "".join([*pieces, got[end:]])


def within_printed_precision(want: str, got: str) -> str:
    """``got``, with each decimal within one unit of ``want``'s last digit written as in ``want``."""
    return _rewrite_close(want, got, DECIMAL, lambda w, g, text: abs(g - w) <= last_digit(text))


# Any number standing alone, integer or decimal, with or without thousands separators
# (21,152 is one number, not 21 and 152): what a timed line prints.
ANY_NUMBER = re.compile(
    r"(?<![\w.,])[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![.,]?\d)"
)


def within_timing_factor(want: str, got: str) -> str:
    """``got``, with each number within ``TIMING_FACTOR`` of ``want``'s written as in ``want``."""
    return _rewrite_close(
        want, got, ANY_NUMBER, lambda w, g, _: w > 0 and g > 0 and w / TIMING_FACTOR <= g <= w * TIMING_FACTOR
    )


class NumericOutputChecker(doctest.OutputChecker):
    """doctest's checker, which with ``+NUMBER`` compares decimals to their last printed digit."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        if optionflags & NUMBER:
            got = within_printed_precision(want, got)
        if optionflags & TIMING:
            got = within_timing_factor(want, got)
        return super().check_output(want, got, optionflags)


class NumericDocTestRunner(sphinx.ext.doctest.SphinxDocTestRunner):
    """Sphinx's doctest runner, handed the checker above."""

    def __init__(self, checker=None, verbose=None, optionflags=0):
        super().__init__(checker or NumericOutputChecker(), verbose, optionflags)


def setup(app):
    app.setup_extension("sphinx.ext.doctest")
    # Sphinx (9.0) makes its runners in DocTestBuilder.test_doc, as SphinxDocTestRunner(verbose=...,
    # optionflags=...), and offers no setting for doctest's `checker` argument. Rebinding that one
    # module-level name to a subclass that passes the checker through doctest's documented
    # constructor leaves the builder's own code untouched; subclassing the builder would mean
    # copying its 90-line test_doc. tests/test_numeric_doctest.py runs a real doctest build, so a
    # Sphinx that makes its runners another way fails there rather than dropping the flag.
    sphinx.ext.doctest.SphinxDocTestRunner = NumericDocTestRunner
    return {"parallel_read_safe": True, "parallel_write_safe": True}
