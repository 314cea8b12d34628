"""A synthetic corpus: short stories about animals in a small world.

The world is small enough for a model of about a million parameters to learn in seconds, and
rich enough to show what a language model picks up from raw text: grammar (word order),
facts (each animal has one home) and word associations (which words describe food).

Every sentence comes from a template, so the same seed always gives the same corpus and no
data has to be downloaded.
"""

import random

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

# Two equally large lists of taste words. The corpus uses both lists equally often, so a
# model pretrained on it has no reason to prefer one polarity over the other: that is what
# lets the sentiment tasks start near chance.
GOOD_TASTES = ("sweet", "fresh", "tasty", "warm", "crisp", "rich", "soft", "ripe")
BAD_TASTES = ("stale", "bland", "burnt", "sour", "cold", "dry", "soggy", "rotten")
MOODS = ("happy", "sad", "calm", "tired", "brave", "scared", "hungry", "sleepy")


def _story(rng: random.Random) -> str:
    """One story of three to five sentences about one animal."""
    animal, other = rng.sample(ANIMALS, 2)
    food = rng.choice(FOODS)
    # One or two taste words, each drawn from both lists alike: the corpus never ties a
    # polarity to a food or to a position in the sentence.
    tastes = rng.sample(GOOD_TASTES + BAD_TASTES, rng.randint(1, 2))
    sentences = [
        f"the {rng.choice(COLORS)} {animal} lives in the {ANIMAL_HOMES[animal]}.",
        f"the {animal} goes to the {rng.choice(PLACES)}.",
        f"the {animal} eats the {food}. the {food} is {' and '.join(tastes)}.",
        f"the {animal} sees a {rng.choice(COLORS)} {other}.",
        f"the {animal} is {rng.choice(MOODS)}.",
        f"the {other} lives in the {ANIMAL_HOMES[other]}.",
    ]
    # The home sentence always opens the story; the rest come in a random order and number.
    rest = rng.sample(sentences[1:], rng.randint(2, 4))
    return " ".join([sentences[0], *rest])


# A seed no training run uses: stories drawn with it are held-out text of the same distribution.
HELDOUT_TEXT_SEED = 1_000_003


def make_corpus(num_stories: int, seed: int = 0) -> list[str]:
    """Return ``num_stories`` stories; the same ``seed`` always gives the same list."""
    if num_stories < 1:
        raise ValueError(f"num_stories must be at least 1, got {num_stories}")
    rng = random.Random(seed)
    return [_story(rng) for _ in range(num_stories)]
