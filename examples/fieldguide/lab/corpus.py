"""A synthetic corpus: short stories about animals in a small world.

The world is small enough for a model of a few hundred thousand parameters to learn in under a
minute, and rich enough to show what a language model picks up from raw text:

* grammar (word order) and word associations (which words describe food);
* facts stored in the weights: each animal has one home, stated in every story about it;
* reviews that need reading: a taste word can be negated ("not fresh") and two can be joined
  by "and" or "but"; how an animal feels about a review follows the sentiment rule, shown for
  training reviews only (``fieldguide.lab.reviews``);
* facts that only the context gives: where an animal is *today*, stated in a story and asked
  at its end, which teaches the model to read what it is given.

Every sentence comes from a template, so the same seed always gives the same corpus and no
data has to be downloaded.
"""

import random

from fieldguide.lab.reviews import BAD_TASTES, GOOD_TASTES, SENTIMENT_LABELS, review_split

# Each animal lives in exactly one place. The model can only learn these pairs by reading the
# corpus, which makes them a clean probe of "knowledge stored in the weights".
ANIMAL_HOMES = {
    "fox": "forest",
    "duck": "lake",
    "frog": "pond",
    "owl": "tree",
    "bear": "cave",
    "horse": "barn",
    "mouse": "field",
    "goat": "hill",
    "crab": "beach",
    "bee": "garden",
}
ANIMALS = tuple(ANIMAL_HOMES)
PLACES = tuple(ANIMAL_HOMES.values())
COLORS = ("red", "blue", "green", "brown", "white", "black", "gray", "yellow")
FOODS = ("apple", "bread", "soup", "cake", "fish", "berry", "nut", "corn", "pie", "rice")
MOODS = ("happy", "sad", "calm", "tired", "brave", "scared", "hungry", "sleepy")
# "good" and "bad" are the sentiment task's label words. The corpus uses them in how an animal
# feels, so each is one token and the base model knows both.
FEELINGS = SENTIMENT_LABELS

# -- Reviews -------------------------------------------------------------------------------------


def taste_clause(rng: random.Random) -> str:
    """A taste word, negated half the time: ``"fresh"`` or ``"not fresh"``."""
    word = rng.choice(GOOD_TASTES + BAD_TASTES)
    return f"not {word}" if rng.random() < 0.5 else word


def random_review(food: str, rng: random.Random) -> str:
    """One clause or two joined by "and" or "but", with no tie between polarity and anything."""
    shape = rng.choice(("one", "and", "but"))
    if shape == "one":
        return f"the {food} is {taste_clause(rng)}."
    return f"the {food} is {taste_clause(rng)} {shape} {taste_clause(rng)}."


# Reviews the corpus says an animal feels good or bad about: from the training split only, so
# no held-out review ever appears next to its label, and never one with "but", so that what
# "but" does is left for fine-tuning to teach.
TRAINING_REVIEWS = [(review, label) for review, label in review_split()[0] if " but " not in review]


def tasting_prompt(animal: str, food: str, review: str) -> str:
    """A review in the corpus's words, up to the feeling that the rule decides."""
    return f"the {animal} tastes the {food}. it is {review}. the {animal} feels"


def tasting(animal: str, food: str, rng: random.Random) -> str:
    """A review and how the animal feels about it: the sentiment rule, shown by example."""
    review, label = rng.choice(TRAINING_REVIEWS)
    return f"{tasting_prompt(animal, food, review)} {FEELINGS[label]}."


# -- Where an animal is today: facts that only the context can give ---------------------------

# Most stories say where their animal is *today*, a place other than its home, mention it again,
# and ask about it at the end; the rest ask without saying, and the answer is the home. A model
# lowers its loss on those answers only by reading the story, which is what teaches the base
# model to use its context, as retrieval and few-shot prompts need. A story that names today's
# place several times ("bursty", in the sense of Chan et al. 2022) gives several tokens that
# copying predicts, not one answer; with fewer mentions, the lab's model learned to copy
# within its pretraining budget on fewer seeds.
TODAY_SHARE = 0.8  # of stories that state where their animal is today
MENTIONS = (
    "the {animal} plays at the {place}.",
    "the {animal} naps at the {place}.",
    "the {animal} eats at the {place}.",
)


def today_fact(animal: str, place: str) -> str:
    return f"today the {animal} is at the {place}."


def today_question(animal: str) -> str:
    """The question, up to the answer; a story continues it with `` <place>.``."""
    return f"where is the {animal} today? the {animal} is at the"


def today_sentences(
    who: list[str], rng: random.Random, max_mentions: int = len(MENTIONS)
) -> tuple[list[str], dict[str, str]]:
    """Each animal's fact, then up to ``max_mentions`` more sentences at the same place."""
    where = {animal: rng.choice([p for p in PLACES if p != ANIMAL_HOMES[animal]]) for animal in who}
    sentences = []
    for animal in who:
        sentences.append(today_fact(animal, where[animal]))
        mentions = rng.sample(MENTIONS, rng.randint(min(1, max_mentions), max_mentions))
        sentences += [m.format(animal=animal, place=where[animal]) for m in mentions]
    return sentences, where


# -- Stories -------------------------------------------------------------------------------------


def _story(rng: random.Random) -> str:
    """One story about one animal: its home first, then a few sentences, maybe today's place."""
    animal, other = rng.sample(ANIMALS, 2)
    food = rng.choice(FOODS)
    head = f"the {rng.choice(COLORS)} {animal} lives in the {ANIMAL_HOMES[animal]}."
    sentences = [
        f"the {animal} eats the {food}. {random_review(food, rng)}",
        tasting(animal, food, rng),
        f"the {animal} sees a {rng.choice(COLORS)} {other}.",
        f"the {animal} is {rng.choice(MOODS)}.",
        f"the {other} feels {rng.choice(FEELINGS)}.",
        f"the {other} lives in the {ANIMAL_HOMES[other]}.",
    ]
    rest = rng.sample(sentences, rng.randint(2, 4))
    if rng.random() >= TODAY_SHARE:  # no fact about today: the answer is the home
        return " ".join([head, *rest, f"{today_question(animal)} {ANIMAL_HOMES[animal]}."])
    facts, where = today_sentences([animal], rng)
    body = [head, *facts, *rest[: rng.randint(0, 2)]]  # the other animal's home is a distractor
    return " ".join([*body, f"{today_question(animal)} {where[animal]}."])


# A seed no training run uses: stories drawn with it are held-out text of the same distribution.
HELDOUT_TEXT_SEED = 1_000_003


def make_corpus(num_stories: int, seed: int = 0) -> list[str]:
    """Return ``num_stories`` stories; the same ``seed`` always gives the same list."""
    if num_stories < 1:
        raise ValueError(f"num_stories must be at least 1, got {num_stories}")
    rng = random.Random(seed)
    return [_story(rng) for _ in range(num_stories)]
