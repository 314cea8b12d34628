"""The synthetic corpus: deterministic, seeded, and refusing an empty request."""

import pytest

from fieldguide.lab.corpus import make_corpus


def test_corpus_is_deterministic_and_seed_dependent():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3)
    assert make_corpus(50, seed=3) != make_corpus(50, seed=4)


def test_corpus_rejects_an_empty_request():
    with pytest.raises(ValueError, match="at least 1"):
        make_corpus(0)
