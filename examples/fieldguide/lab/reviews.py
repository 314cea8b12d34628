"""The review grammar: taste words, the sentiment rule, and which reviews are held out.

A review of a food is one taste clause or two joined by "and" or "but"; a clause is a taste
word, maybe negated. Its sentiment follows a rule, so a model has to read the whole sentence:

* a clause has its word's polarity, flipped by "not": "fresh" is good, "not fresh" bad;
* "X and Y" joins clauses of one polarity, which they share;
* "X but Y" joins clauses of opposite polarity, and Y decides.

The split between reviews a model may learn from and held-out reviews is fixed here, once
for the whole lab, because two places need it: the pretraining corpus states how an animal
feels about training reviews only, and the sentiment task scores the held-out ones. A review's
*key* is the set of its words, so "fresh but stale" and "stale but fresh" always fall on the
same side.
"""

import functools
import itertools
import random

# Two equally large lists of taste words, used equally often with and without "not".
GOOD_TASTES = ("sweet", "fresh", "tasty", "warm", "crisp", "rich", "soft", "ripe")
BAD_TASTES = ("stale", "bland", "burnt", "sour", "cold", "dry", "soggy", "rotten")
# The label words, one token each in the lab's tokenizer: label 0 is "bad", 1 is "good".
SENTIMENT_LABELS = ("bad", "good")

# A clause is (negated, word).
CLAUSES = [(negated, word) for word in GOOD_TASTES + BAD_TASTES for negated in (False, True)]

# Taste words never negated in anything a model learns the rule from: every review with
# "not <word>" for one of these is held out, so the held-out split also asks whether a model
# learned what "not" does, not just what each negated word means.
UNSEEN_NEGATIONS = ("warm", "soggy")
HELDOUT_SHARE = 0.15  # of the two-clause keys, drawn at random, besides the unseen negations
SPLIT_SEED = 0  # one split for the whole lab, whatever seed a run uses


def clause_text(clause: tuple[bool, str]) -> str:
    negated, word = clause
    return f"not {word}" if negated else word


def clause_label(clause: tuple[bool, str]) -> int:
    """1 (good) or 0 (bad): "fresh" is good, "not fresh" is bad, "not stale" is good."""
    negated, word = clause
    return int((word in GOOD_TASTES) != negated)


def all_reviews() -> list[tuple[str, int]]:
    """Every review the grammar allows, without its food: ("not fresh but warm", 1), ...

    "and" joins clauses of one polarity and "but" clauses of opposite ones, so every
    review's label is unambiguous; no review uses one taste word twice.
    """
    reviews = [(clause_text(c), clause_label(c)) for c in CLAUSES]
    for first, second in itertools.permutations(CLAUSES, 2):
        if first[1] == second[1]:
            continue
        joiner = "and" if clause_label(first) == clause_label(second) else "but"
        # Both joiners end on the second clause's label: "and" because the two agree.
        reviews.append((f"{clause_text(first)} {joiner} {clause_text(second)}", clause_label(second)))
    return reviews


def review_key(review: str) -> tuple[str, ...]:
    """The words a review is built from, order aside: its content key."""
    return tuple(sorted(set(review.rstrip(".").split())))


def is_heldout(review: str) -> bool:
    """Whether a review (without its food) belongs to the held-out split."""
    return review_key(review) in heldout_keys()


@functools.cache  # one split for the whole lab: computed once, then shared
def heldout_keys() -> frozenset[tuple[str, ...]]:
    """A random 15% of the two-clause keys, and every key that negates an unseen negation word."""
    two_clause = sorted({review_key(text) for text, _ in all_reviews() if " " in clause_free(text)})
    random.Random(SPLIT_SEED).shuffle(two_clause)  # sorted first, so hashing never matters
    drawn = set(two_clause[: round(len(two_clause) * HELDOUT_SHARE)])
    unseen = {
        review_key(text) for text, _ in all_reviews() if any(f"not {w}" in text for w in UNSEEN_NEGATIONS)
    }
    return frozenset(drawn | unseen)


def clause_free(review: str) -> str:
    """The review with "not" dropped: one word for a one-clause review, three for two."""
    return " ".join(word for word in review.split() if word != "not")


def three_clause_reviews(count: int = 200) -> list[tuple[str, int]]:
    """Longer reviews than any a model trains on: "X and Y but Z" and "X but Y and Z".

    The rule extends as it reads: "and" joins clauses that agree, "but" turns to the other
    polarity, and the last clause decides. Half are good, half bad.
    """
    rng = random.Random(SPLIT_SEED)
    reviews = set()
    while len(reviews) < count:
        first, second, third = rng.sample([word for _, word in CLAUSES[::2]], 3)
        polarity = len(reviews) % 2  # the label of the review, alternating
        # Negate each word as needed so that every clause has the polarity the shape asks for.
        shape = rng.choice(("and-but", "but-and"))
        wanted = (
            (1 - polarity, 1 - polarity, polarity)
            if shape == "and-but"
            else (1 - polarity, polarity, polarity)
        )
        clauses = [
            (clause_label((False, word)) != want, word)
            for word, want in zip((first, second, third), wanted, strict=True)
        ]
        a, b, c = (clause_text(clause) for clause in clauses)
        text = f"{a} and {b} but {c}" if shape == "and-but" else f"{a} but {b} and {c}"
        reviews.add((text, polarity))
    return sorted(reviews)


# The held-out split's three kinds of review, each a different way to generalise.
HELDOUT_KINDS = ("two clauses, new word sets", "a word never negated in training", "three clauses")


def heldout_kind(review: str) -> str:
    """Which of ``HELDOUT_KINDS`` a held-out review (or a sentence containing one) is: the
    pages score each kind apart, since an average over them hides where a method fails."""
    if review.count(" but ") + review.count(" and ") == 2:
        return HELDOUT_KINDS[2]
    if any(f"not {word}" in review for word in UNSEEN_NEGATIONS):
        return HELDOUT_KINDS[1]
    return HELDOUT_KINDS[0]


def review_split() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(training reviews, held-out reviews), each a list of (review, label).

    A plain taste word ("fresh") is vocabulary, not a composition: it always trains. The
    held-out split also holds three-clause reviews, a length no training review has.
    """
    reviews = all_reviews()
    train = [r for r in reviews if not is_heldout(r[0])]
    return train, [r for r in reviews if is_heldout(r[0])] + three_clause_reviews()
