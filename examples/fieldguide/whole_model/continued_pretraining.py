"""Continued pretraining: keep training a base model by next-token prediction on a new domain.

The lab's base model has read only stories about animals. Here it meets a domain it has never
seen, stories about ships at sea, built from templates whose content words the animal corpus
never uses. Continued pretraining on that unlabeled text brings its perplexity on unseen sea
stories down; mixing some of the original corpus back in keeps it from forgetting the animals.

Run it on any causal LM::

    python -m fieldguide.whole_model.continued_pretraining --model tiny --max-steps 60 --replay 0.25
"""

import random
import statistics
from collections.abc import Callable
from dataclasses import replace

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    add_output_argument,
    add_replay_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    training_config,
)
from fieldguide.lab.corpus import HELDOUT_TEXT_SEED, make_corpus
from fieldguide.lab.data import encode_completion, pack_texts, pretraining_blocks, with_replay
from fieldguide.lab.experiment import (
    Presets,
    Technique,
    plot_losses,
    real_model_training,
    run_technique,
)
from fieldguide.lab.loading import load_model, parse_and_load, save_if_asked
from fieldguide.lab.metrics import perplexity, sequence_logprobs, text_losses
from fieldguide.lab.pretrain import PretrainConfig
from fieldguide.lab.training import TrainConfig

# -- The new domain -----------------------------------------------------------------------------

# Each sailor has one ship, as each animal has one home: a fact only reading can teach.
SAILOR_SHIPS = {
    "captain": "galleon",
    "pirate": "schooner",
    "fisherman": "trawler",
    "admiral": "frigate",
    "smuggler": "sloop",
    "navigator": "clipper",
    "boatswain": "whaler",
    "harpooner": "ketch",
    "lookout": "yacht",
    "deckhand": "steamer",
    "merchant": "barge",
    "explorer": "dinghy",
}
# Every story states its sailor's fact; only the stories of the asked half also ask it as a
# question and answer it. A question about the other half measures what reading taught.
ASKED_SAILORS = tuple(SAILOR_SHIPS)[0::2]
UNASKED_SAILORS = tuple(SAILOR_SHIPS)[1::2]
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
    if sailor in ASKED_SAILORS:  # the question form, with its answer, for half the sailors
        sentences.append(fact_question(sailor) + f" {ship}.")
    # The ship sentence opens the story, like the home sentence of the animal stories.
    return " ".join([sentences[0], *rng.sample(sentences[1:], rng.randint(2, 4))])


def fact_question(sailor: str) -> str:
    """The question that probes a sailor's fact; the answer is a ship's name, then a full stop."""
    return f"which ship does the {sailor} sail? the"


def make_sea_corpus(num_stories: int, seed: int = 0) -> list[str]:
    """Return ``num_stories`` sea stories; the same ``seed`` always gives the same list."""
    if num_stories < 1:
        raise ValueError(f"num_stories must be at least 1, got {num_stories}")
    rng = random.Random(seed)
    return [_sea_story(rng) for _ in range(num_stories)]


# -- The fact probe ----------------------------------------------------------------------------


def fact_outcomes(model, tokenizer, sailors) -> list[int]:
    """1 where the model finds the sailor's own ship the likeliest answer of all the ships, else 0.

    Each candidate is scored by its summed log-probability after the question, as
    ``classify_sentiment`` scores its label words; with 12 ships, chance is 1/12.
    """
    ships = list(SAILOR_SHIPS.values())
    examples = [
        encode_completion(tokenizer, fact_question(sailor), f" {ship}.")
        for sailor in sailors
        for ship in ships
    ]
    scores = sequence_logprobs(model, examples).view(len(sailors), len(ships))  # (sailors, ships)
    picked = scores.argmax(dim=-1).tolist()
    return [int(ships[i] == SAILOR_SHIPS[sailor]) for sailor, i in zip(sailors, picked, strict=True)]


def fact_accuracy(sailors) -> Callable:
    """A measure for the harness: the share of ``sailors`` whose ship the model picks."""
    return lambda model, tokenizer: statistics.mean(fact_outcomes(model, tokenizer, sailors))


# -- Continued pretraining ----------------------------------------------------------------------

NUM_STORIES = 600  # unlabeled sea stories to train on
BLOCK_SIZE = 64  # tokens per packed block
HELDOUT_SEA_SEED = 2_000_003  # a sea-corpus seed no training run uses

PRESETS = Presets(
    # 60 steps of 8 blocks, a third of the pretraining rate, re-warmed from zero: the old
    # schedule had decayed.
    tiny=TrainConfig(max_steps=60, batch_size=8, learning_rate=1e-3, warmup_steps=6),
    # A real model: the fine-tuning preset, since a few hundred stories are a fine-tuning-sized
    # corpus, re-warmed over the same 6 steps.
    real=real_model_training(max_steps=60, warmup_steps=6),
)


def training_blocks(tokenizer, replay_fraction: float = 0.0, seed: int = 0) -> list[dict]:
    """Packed sea stories, plus original-corpus blocks making up ``replay_fraction`` of them."""
    sea = pack_texts(tokenizer, make_sea_corpus(NUM_STORIES, seed), BLOCK_SIZE)
    pretraining_seed = PretrainConfig().train.seed  # the stories the model was pretrained on
    replay = lambda n: pretraining_blocks(tokenizer, n, BLOCK_SIZE, pretraining_seed)
    return with_replay(sea, replay, replay_fraction)


def domain_adaptation(replay_fraction: float = 0.0, seed: int = 0, num_heldout: int = 50) -> Technique:
    """Next-token prediction on sea stories; scored by each held-out sea story's loss."""
    sea = make_sea_corpus(num_heldout, seed=HELDOUT_SEA_SEED)
    animals = make_corpus(num_heldout, seed=HELDOUT_TEXT_SEED)
    return Technique(
        data=lambda tokenizer: training_blocks(tokenizer, replay_fraction, seed),
        score=lambda model, tokenizer: text_losses(model, tokenizer, sea),
        measures={
            "new-domain perplexity": lambda model, tokenizer: perplexity(model, tokenizer, sea),
            "original perplexity": lambda model, tokenizer: perplexity(model, tokenizer, animals),
            "fact accuracy, unasked": fact_accuracy(UNASKED_SAILORS),  # stated only: learned by reading
            "fact accuracy, asked": fact_accuracy(ASKED_SAILORS),  # also asked and answered in training
        },
    )


@cached  # the page's doctests and its figure share one run per setting
def run_continued_pretraining(replay_fraction: float = 0.0, max_steps: int | None = None):
    """Continue pretraining a fresh copy of the tiny model, with optional replay; keep the model."""
    model, tokenizer = load_model("tiny")
    config = PRESETS.tiny if max_steps is None else replace(PRESETS.tiny, max_steps=max_steps)
    return run_technique(domain_adaptation(replay_fraction), model, tokenizer, config, keep_model=True)


def loss_figure(ax) -> None:
    """The training loss with and without replay."""
    runs = {"sea stories": run_continued_pretraining(), "with 25% replay": run_continued_pretraining(0.25)}
    plot_losses(ax, runs, "Continued pretraining on a new domain")


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Continue pretraining a causal LM on sea stories; report both domains.")
    add_training_arguments(parser, PRESETS)
    add_replay_argument(parser)
    add_output_argument(parser)
    args, model, tokenizer = parse_and_load(parser, argv)
    config = training_config(args, PRESETS)
    technique = domain_adaptation(args.replay, args.seed)
    run = run_technique(technique, model, tokenizer, config, keep_model=args.output is not None)
    print(run.report("sea-story loss"))
    save_if_asked(args.output, run.model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
