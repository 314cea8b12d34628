"""The review grammar: the sentiment rule, and one held-out split that nothing trains on."""

import pytest

from fieldguide.lab.reviews import (
    HELDOUT_KINDS,
    UNSEEN_NEGATIONS,
    all_reviews,
    heldout_keys,
    heldout_kind,
    review_key,
    review_split,
    three_clause_reviews,
)


@pytest.mark.parametrize(
    ("review", "label"),
    [
        ("fresh", 1),
        ("not fresh", 0),
        ("not stale", 1),
        ("stale and not warm", 0),
        ("stale but warm", 1),
        ("warm but stale", 0),
        ("not stale but not warm", 0),
        ("not warm but not stale", 1),
    ],
)
def test_sentiment_follows_the_rule(review, label):
    assert dict(all_reviews())[review] == label


def test_every_review_is_unambiguous():
    texts = [text for text, _ in all_reviews()]
    assert len(set(texts)) == len(texts) == 992  # 32 one-clause reviews, 960 two-clause ones


def test_order_twins_fall_in_one_split():
    # The leak this design closes: "fresh but stale" trained while "stale but fresh" is held out.
    train, heldout = review_split()
    assert not {review_key(text) for text, _ in train} & {review_key(text) for text, _ in heldout}
    longer = set(three_clause_reviews())
    assert {review_key(text) for text, _ in heldout if (text, _) not in longer} == heldout_keys()


def test_three_clause_reviews_follow_the_rule_and_never_train():
    train, heldout = review_split()
    longer = three_clause_reviews()
    assert set(longer) <= set(heldout) and len(set(longer)) == 200
    assert all(text.count(" and ") == 1 and text.count(" but ") == 1 for text, _ in longer)
    assert not [
        text for text, _ in train if text.count(" ") - text.count("not") > 2
    ]  # no training review has three clauses
    # The last clause decides, and "and" joins clauses that agree: read it back word by word.
    for text, label in longer:
        *_, last = text.replace(" and ", " but ").split(" but ")
        assert label == dict(all_reviews())[last], text
    assert ("bland and burnt but rich", 1) in longer


def test_unseen_negations_are_held_out_and_plain_words_train():
    train, heldout = review_split()
    assert not [text for text, _ in train if any(f"not {word}" in text for word in UNSEEN_NEGATIONS)]
    assert {text for text, _ in train if " " not in text} == {
        text for text, _ in all_reviews() if " " not in text
    }
    assert ("not warm", 0) in heldout


def test_both_splits_are_balanced():
    for reviews in review_split():
        share_good = sum(label for _, label in reviews) / len(reviews)
        assert abs(share_good - 0.5) < 0.03, share_good


def test_every_heldout_review_is_of_one_kind_and_the_kinds_are_the_splits_parts():
    _, heldout = review_split()
    of_kind = {
        kind: {review for review, _ in heldout if heldout_kind(review) == kind} for kind in HELDOUT_KINDS
    }
    assert of_kind[HELDOUT_KINDS[2]] == {review for review, _ in three_clause_reviews()}
    negating = of_kind[HELDOUT_KINDS[1]]
    assert negating and all(any(f"not {w}" in r for w in UNSEEN_NEGATIONS) for r in negating)
    assert of_kind[HELDOUT_KINDS[0]] and sum(map(len, of_kind.values())) == len(heldout)
    assert heldout_kind("the pear is fresh but stale.") == HELDOUT_KINDS[0]  # a sentence holding one
