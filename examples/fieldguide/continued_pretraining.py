"""Continued pretraining: keep training a base model by next-token prediction on a new domain.

The lab's base model has read only stories about animals. Here it meets a domain it has never
seen, stories about ships at sea, built from templates whose content words the animal corpus
never uses. Continued pretraining on that unlabeled text brings its perplexity on unseen sea
stories down; mixing some of the original corpus back in keeps it from forgetting the animals.

Run it on any causal LM::

    python -m fieldguide.continued_pretraining --model tiny --steps 60 --replay 0.25
"""

import functools
import random
import time
from dataclasses import dataclass

import torch

from fieldguide.cli import (
    add_training_arguments,
    example_parser,
    main_guard,
    non_negative_float,
    parse_and_load,
)
from fieldguide.corpus import make_corpus
from fieldguide.data import pack_texts, pad_batch
from fieldguide.evaluate import HELDOUT_TEXT_SEED
from fieldguide.loading import load_model
from fieldguide.metrics import perplexity
from fieldguide.pretrain import PretrainConfig
from fieldguide.training import TrainConfig, train

# -- The new domain -----------------------------------------------------------------------------

# Each sailor has one ship, as each animal has one home: a fact only reading can teach.
SAILOR_SHIPS = {
    "captain": "galleon",
    "pirate": "schooner",
    "fisherman": "trawler",
    "admiral": "frigate",
    "smuggler": "sloop",
    "navigator": "clipper",
}
HARBORS = ("harbor", "port", "dock", "island", "lighthouse", "reef")
WEATHER = ("stormy", "foggy", "windy", "misty", "icy", "hazy")
CREATURES = ("whale", "shark", "dolphin", "seagull", "octopus", "walrus")
CARGO = ("silk", "coal", "wool", "spices", "timber", "salt")


def _sea_story(rng: random.Random) -> str:
    """One story of three to five sentences about one sailor and their ship."""
    sailor = rng.choice(list(SAILOR_SHIPS))
    ship = SAILOR_SHIPS[sailor]
    sentences = [
        f"the {sailor} sails the {ship}.",
        f"the {ship} carries {rng.choice(CARGO)} to the {rng.choice(HARBORS)}.",
        f"the sea is {rng.choice(WEATHER)}.",
        f"the {sailor} spots a {rng.choice(CREATURES)}.",
        f"the {ship} anchors near the {rng.choice(HARBORS)}.",
    ]
    # The ship sentence opens the story, like the home sentence of the animal stories.
    return " ".join([sentences[0], *rng.sample(sentences[1:], rng.randint(2, 4))])


def make_sea_corpus(num_stories: int, seed: int = 0) -> list[str]:
    """Return ``num_stories`` sea stories; the same ``seed`` always gives the same list."""
    if num_stories < 1:
        raise ValueError(f"num_stories must be at least 1, got {num_stories}")
    rng = random.Random(seed)
    return [_sea_story(rng) for _ in range(num_stories)]


# -- Continued pretraining ----------------------------------------------------------------------


@dataclass(frozen=True)  # frozen, so it can key the cache of run_continued_pretraining
class ContinuedPretrainingConfig:
    num_stories: int = 600  # unlabeled sea stories to train on
    max_steps: int = 60  # optimizer steps
    batch_size: int = 8  # blocks per step
    block_size: int = 64  # tokens per packed block
    learning_rate: float = 1e-3  # peak AdamW rate, a third of the pretraining rate
    warmup_steps: int = 6  # re-warm the rate from zero: the old schedule had decayed
    replay_fraction: float = 0.0  # share of the training blocks taken from the original corpus
    seed: int = 0  # the sea corpus and the order of the blocks

    def __post_init__(self):
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")


HELDOUT_SEA_SEED = 2_000_003  # a sea-corpus seed no training run uses


def training_blocks(tokenizer, config: ContinuedPretrainingConfig) -> list[dict]:
    """Packed sea stories, plus original-corpus blocks making up ``replay_fraction`` of them."""
    sea = pack_texts(tokenizer, make_sea_corpus(config.num_stories, config.seed), config.block_size)
    share = config.replay_fraction
    num_replay = round(len(sea) * share / (1 - share))  # replay / (sea + replay) = share
    if num_replay == 0:
        return sea
    # The first stories of the pretraining seed are the very stories the model was trained on.
    old = pack_texts(tokenizer, make_corpus(num_replay * 2, seed=PretrainConfig().seed), config.block_size)
    return sea + old[:num_replay]  # two stories fill more than one block of 64 tokens


@dataclass
class DomainPerplexities:
    new_domain: float  # on unseen sea stories
    original: float  # on unseen animal stories: a rise is forgetting


def domain_perplexities(model, tokenizer, num_stories: int = 50) -> DomainPerplexities:
    """Perplexity on held-out text of both domains, from seeds no training run uses."""
    return DomainPerplexities(
        new_domain=perplexity(model, tokenizer, make_sea_corpus(num_stories, seed=HELDOUT_SEA_SEED)),
        original=perplexity(model, tokenizer, make_corpus(num_stories, seed=HELDOUT_TEXT_SEED)),
    )


def continue_pretraining(model, tokenizer, config: ContinuedPretrainingConfig) -> list[float]:
    """Next-token prediction on the new domain, in place; return the loss of every step."""
    train_config = TrainConfig(
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
    )
    blocks = training_blocks(tokenizer, config)
    return train(model, blocks, train_config, collate=lambda ex: pad_batch(ex, tokenizer.pad_token_id))


@dataclass
class ContinuedPretrainingResult:
    losses: list[float]  # the training loss of every optimizer step
    before: DomainPerplexities
    after: DomainPerplexities
    seconds: float  # wall-clock time of the training alone


def adapt_and_score(model, tokenizer, config: ContinuedPretrainingConfig) -> ContinuedPretrainingResult:
    """Measure both domains, continue pretraining, measure again."""
    before = domain_perplexities(model, tokenizer)
    start = time.perf_counter()
    losses = continue_pretraining(model, tokenizer, config)
    seconds = time.perf_counter() - start
    return ContinuedPretrainingResult(losses, before, domain_perplexities(model, tokenizer), seconds)


@functools.cache  # the page's doctests and the command line share one run per config
def run_continued_pretraining(
    config: ContinuedPretrainingConfig = ContinuedPretrainingConfig(),
) -> ContinuedPretrainingResult:
    """Continue pretraining a fresh copy of the tiny model with ``config``."""
    model, tokenizer = load_model("tiny")
    torch.manual_seed(config.seed)
    return adapt_and_score(model, tokenizer, config)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Continue pretraining a causal LM on sea stories; report both domains.")
    defaults = ContinuedPretrainingConfig()
    add_training_arguments(parser, defaults, batch_size=False)
    parser.add_argument(
        "--replay", type=non_negative_float, default=0.0, help="share of original text, in [0, 1)"
    )
    args, model, tokenizer = parse_and_load(parser, argv)
    config = ContinuedPretrainingConfig(
        max_steps=args.steps, learning_rate=args.learning_rate, replay_fraction=args.replay, seed=args.seed
    )
    result = adapt_and_score(model, tokenizer, config)
    print(f"new-domain perplexity  {result.before.new_domain:.2f} -> {result.after.new_domain:.2f}")
    print(f"original perplexity    {result.before.original:.2f} -> {result.after.original:.2f}")
    print(f"training time          {result.seconds:.1f} s")


if __name__ == "__main__":
    main_guard(main)
