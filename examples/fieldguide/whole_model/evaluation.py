"""Score a model on the lab's three tasks and on held-out text.

The numbers every technique page reports before and after training::

    python -m fieldguide.whole_model.evaluation --model tiny
"""

from dataclasses import asdict, dataclass

from fieldguide.lab.cli import example_parser, main_guard
from fieldguide.lab.loading import parse_and_load
from fieldguide.lab.metrics import exact_match, heldout_perplexity, preference_accuracy, sentiment_accuracy
from fieldguide.lab.tasks import instruction_task, preference_task, sentiment_task


@dataclass
class Scores:
    sentiment_accuracy: float  # zero-shot label accuracy; chance is 0.5
    instruction_exact_match: float  # greedy answer equals the reference; chance is about 0
    preference_accuracy: float  # chosen more likely than rejected; chance is 0.5
    heldout_perplexity: float  # on unseen stories from the pretraining distribution


def evaluate(model, tokenizer) -> Scores:
    """All four numbers, each on its held-out split."""
    return Scores(
        sentiment_accuracy=sentiment_accuracy(model, tokenizer, sentiment_task().heldout),
        instruction_exact_match=exact_match(model, tokenizer, instruction_task().heldout),
        preference_accuracy=preference_accuracy(model, tokenizer, preference_task().heldout),
        heldout_perplexity=heldout_perplexity(model, tokenizer),
    )


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Score a model on the lab's held-out splits.")
    _, model, tokenizer = parse_and_load(parser, argv, training=False)
    for name, value in asdict(evaluate(model, tokenizer)).items():
        print(f"{name:26s} {value:.3f}")


if __name__ == "__main__":
    main_guard(main)
