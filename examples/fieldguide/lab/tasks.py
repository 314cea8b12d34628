"""The fine-tuning tasks every technique page shares, with their metrics.

* **Sentiment** (classification): is a short food review good or bad? The label follows a
  rule over the words ("not" flips a taste word, "but" lets the second clause decide), so a
  model has to read the whole review, and held-out reviews are compositions never trained on.
* **Instructions** (prompt to response): follow a one-line command about a list of words.
* **Preferences** (prompt, chosen, rejected): of two reviews, prefer the good one, the
  controlled-sentiment setting of the DPO paper at toy scale.

Each example has a *content key*, the set of words it is built from. Train and held-out
splits never share a key, so a held-out score measures what a technique taught about the
rule, not which examples it memorised: "fresh but stale" and "stale but fresh" fall in the
same split. The pretrained base model knows every word used here but has never seen these
formats, so it starts near chance: whatever a technique adds shows up as a gain.
"""

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from fieldguide.lab.corpus import ANIMALS, COLORS, FOODS, HELDOUT_TEXT_SEED, today_question, today_sentences
from fieldguide.lab.data import encode_completion
from fieldguide.lab.reviews import SENTIMENT_LABELS, review_key, review_split

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
class ContextExample:
    passage: str  # says where two animals are today
    question: str  # asks where one of them is, up to the answer
    answer: str  # the place the passage gives: never the animal's home


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str


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


def verbalized_example(tokenizer, example: ClassificationExample) -> dict:
    """The review in the verbalizer prompt, then its label word; the loss is on the label only."""
    # The same prompt and label words the lab's sentiment metric scores.
    return encode_completion(tokenizer, sentiment_prompt(example.text), label_word(example.label))


def split_by_key(items: list[T], key: Callable[[T], Hashable], heldout_share: float, seed: int) -> Split[T]:
    """Hold out a random ``heldout_share`` of the content keys, with every item that has one.

    Splitting keys rather than items is what keeps near-twins (the same words in another
    order) on one side: no held-out key occurs in training.
    """
    keys = sorted({key(item) for item in items})  # sorted, so the split never depends on hashing
    random.Random(seed).shuffle(keys)
    heldout_keys = set(keys[: round(len(keys) * heldout_share)])
    rng = random.Random(seed + 1)  # then shuffle each split, so neither is sorted by key
    train = [item for item in items if key(item) not in heldout_keys]
    heldout = [item for item in items if key(item) in heldout_keys]
    return Split(train=rng.sample(train, len(train)), heldout=rng.sample(heldout, len(heldout)))


# -- Sentiment: a rule over the words ----------------------------------------------------------


def sentiment_key(example: ClassificationExample) -> tuple[str, ...]:
    """The words a review is built from, food and order aside."""
    return review_key(example.text.split(" is ", 1)[1])  # drop "the <food> is"


def sentiment_task(seed: int = 0) -> Split[ClassificationExample]:
    """Label a review 0 (bad) or 1 (good); held-out reviews are word sets never trained on.

    Which reviews are held out is fixed for the whole lab (``fieldguide.lab.reviews``); the
    seed only picks each review's food and the order of the examples.
    """
    rng = random.Random(seed)
    train, heldout = review_split()

    def examples(reviews):
        out = [ClassificationExample(f"the {rng.choice(FOODS)} is {text}.", label) for text, label in reviews]
        return rng.sample(out, len(out))

    return Split(train=examples(train), heldout=examples(heldout))


def sentiment_validation_split() -> Split[ClassificationExample]:
    """The training reviews split for choosing settings: four fifths to train on, and a fifth
    of their word sets, held back whole as the held-out split's are, to score on. A setting
    chosen on it never saw a held-out review."""
    return split_by_key(sentiment_task().train, sentiment_key, heldout_share=0.2, seed=0)


# -- Instructions ------------------------------------------------------------------------------

# Each instruction maps a list of words to an answer. The rules are easy to state and check,
# and held-out prompts use word sets never seen in training, in any order or command, so
# exact match on them measures whether the model learned the rule rather than the answers.
INSTRUCTIONS = {
    "repeat": lambda words: words,
    "reverse": lambda words: words[::-1],
    "last word of": lambda words: words[-1:],
}


def instruction_key(example: InstructionExample) -> tuple[str, ...]:
    """The words a command is about, order aside, as a sorted tuple."""
    return tuple(sorted(example.prompt.split(": ", 1)[1].split()))


def instruction_task(
    seed: int = 0, num_examples: int = 1650, heldout_share: float = 0.1
) -> Split[InstructionExample]:
    """Commands such as ``reverse: fox red pie`` with answers such as ``pie red fox``."""
    rng = random.Random(seed)
    vocabulary = ANIMALS + COLORS + FOODS
    seen, examples = set(), []
    while len(examples) < num_examples:
        words = rng.sample(vocabulary, 3)
        if frozenset(words) in seen:  # one example per word set
            continue
        seen.add(frozenset(words))
        command = rng.choice(list(INSTRUCTIONS))
        answer = INSTRUCTIONS[command](words)
        examples.append(InstructionExample(f"{command}: {' '.join(words)}", " ".join(answer)))
    return split_by_key(examples, instruction_key, heldout_share, seed)


# -- Reading the context -----------------------------------------------------------------------


def context_task(
    num_examples: int = 200, seed: int = HELDOUT_TEXT_SEED, distractors: int = 0
) -> list[ContextExample]:
    """Where is an animal today? Only the passage says; without it, the corpus's answer is home.

    Passages are drawn with the held-out text seed, so none is a story the model was
    pretrained on. Each states the asked animal's place once, and ``distractors`` other
    animals' places, in a random order.
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(num_examples):
        facts, where = today_sentences(rng.sample(ANIMALS, 1 + distractors), rng, max_mentions=0)
        asked = next(iter(where))
        examples.append(
            ContextExample(" ".join(rng.sample(facts, len(facts))), today_question(asked), where[asked])
        )
    return examples


# -- Preferences -------------------------------------------------------------------------------


def preference_task(seed: int = 0, num_pairs: int = 1200) -> Split[PreferenceExample]:
    """Asked for a review, prefer a good review over a bad one of the same food.

    Pairs are drawn within each sentiment split, so no held-out pair shares a review's
    words with a training pair, on either side.
    """
    rng = random.Random(seed)
    reviews = sentiment_task(seed)

    def pairs(examples: list[ClassificationExample], count: int) -> list[PreferenceExample]:
        good = [ex.text.split(" is ", 1)[1] for ex in examples if ex.label == 1]
        bad = [ex.text.split(" is ", 1)[1] for ex in examples if ex.label == 0]
        out = []
        for _ in range(count):
            food = rng.choice(FOODS)
            out.append(
                PreferenceExample(
                    f"write a review of the {food}.",
                    f"the {food} is {rng.choice(good)}",
                    f"the {food} is {rng.choice(bad)}",
                )
            )
        return out

    num_heldout = round(num_pairs * len(reviews.heldout) / (len(reviews.train) + len(reviews.heldout)))
    return Split(
        train=pairs(reviews.train, num_pairs - num_heldout), heldout=pairs(reviews.heldout, num_heldout)
    )
