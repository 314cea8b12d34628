"""The three fine-tuning tasks every technique page shares, with their metrics.

* **Sentiment** (classification): is a short food review positive or negative?
* **Instructions** (prompt to response): follow a one-line command about a list of words.
* **Preferences** (prompt, chosen, rejected): of two reviews, prefer the positive one, the
  controlled-sentiment setting of the DPO paper at toy scale.

Each task has a train split and a held-out split that share no example, so a metric on the
held-out split measures what a technique taught, not what it memorised. The pretrained base
model knows every word used here but has never seen these formats, so it starts near
chance: whatever a technique adds shows up as a gain.
"""

import itertools
import random
from dataclasses import dataclass
from typing import Generic, TypeVar

from fieldguide.lab.corpus import ANIMALS, BAD_TASTES, COLORS, FOODS, GOOD_TASTES

T = TypeVar("T")


@dataclass(frozen=True)
class Split(Generic[T]):
    train: list[T]
    heldout: list[T]


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: int  # an index into SENTIMENT_LABELS


@dataclass(frozen=True)
class InstructionExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


SENTIMENT_LABELS = ("negative", "positive")
# How a model is asked for a label as text: the review, then a cue whose most likely
# continuation should be the label word (a "verbalizer"). Training on it and scoring by it use
# these same two functions, so they can never drift apart.
SENTIMENT_PROMPT = "{text} overall, the review is"


def sentiment_prompt(text: str) -> str:
    """The verbalizer prompt for one review."""
    return SENTIMENT_PROMPT.format(text=text)


def label_word(label: int) -> str:
    """The completion that names class ``label``: a space, then its word."""
    return " " + SENTIMENT_LABELS[label]


def _split(items: list[T], num_heldout: int, seed: int) -> Split[T]:
    """Shuffle ``items`` with ``seed`` and cut off the last ``num_heldout`` as held out."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return Split(train=items[:-num_heldout], heldout=items[-num_heldout:])


def _reviews(food: str, tastes: tuple[str, ...]) -> list[str]:
    """Every two-adjective review of ``food`` using words from one polarity."""
    pairs = itertools.permutations(tastes, 2)
    return [f"the {food} is {first} and {second}." for first, second in pairs]


def sentiment_task(seed: int = 0, num_heldout: int = 200) -> Split[ClassificationExample]:
    """Label a review 0 (negative) or 1 (positive); the two classes are equally frequent."""
    examples = [
        ClassificationExample(text, label)
        for food in FOODS
        for label, tastes in enumerate((BAD_TASTES, GOOD_TASTES))
        for text in _reviews(food, tastes)
    ]
    return _split(examples, num_heldout, seed)


# Each instruction maps a list of words to an answer. The rules are easy to state and check,
# and the held-out split uses word lists never seen in training, so exact match on it
# measures whether the model learned the rule rather than the answers.
INSTRUCTIONS = {
    "repeat": lambda words: words,
    "reverse": lambda words: words[::-1],
    "last word of": lambda words: words[-1:],
}


def instruction_task(
    seed: int = 0, num_train: int = 1500, num_heldout: int = 150
) -> Split[InstructionExample]:
    """Commands such as ``reverse: fox red pie`` with answers such as ``pie red fox``."""
    rng = random.Random(seed)
    vocabulary = ANIMALS + COLORS + FOODS
    seen, examples = set(), []
    while len(examples) < num_train + num_heldout:
        words = tuple(rng.sample(vocabulary, 3))
        if words in seen:  # a word list appears once, so train and held-out never share one
            continue
        seen.add(words)
        command = rng.choice(list(INSTRUCTIONS))
        answer = INSTRUCTIONS[command](list(words))
        examples.append(InstructionExample(f"{command}: {' '.join(words)}", " ".join(answer)))
    return Split(train=examples[:num_train], heldout=examples[num_train:])


def preference_task(seed: int = 0, num_heldout: int = 200) -> Split[PreferenceExample]:
    """Asked for a review, prefer a positive one over a negative one of the same shape."""
    rng = random.Random(seed)
    examples = []
    for food in FOODS:
        good, bad = _reviews(food, GOOD_TASTES), _reviews(food, BAD_TASTES)
        rng.shuffle(bad)  # pair each positive review with a random negative one
        prompt = f"write a review of the {food}."
        examples += [
            PreferenceExample(prompt, chosen, rejected) for chosen, rejected in zip(good, bad, strict=True)
        ]
    return _split(examples, num_heldout, seed)
