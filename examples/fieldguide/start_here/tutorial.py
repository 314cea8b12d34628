"""Your first fine-tune: teach the lab's base model to follow instructions.

The tutorial page walks through the steps one at a time; this module holds the pieces it
reuses, so that the page's doctests and its loss-curve figure come from one and the same run.
From the command line it does the whole fine-tune, on the tiny model or any causal LM with a
chat template::

    python -m fieldguide.start_here.tutorial --output my-first-fine-tune
"""

from fieldguide.lab.cache import cached
from fieldguide.lab.chat import encode_instructions, require_chat_template
from fieldguide.lab.cli import (
    add_chat_arguments,
    add_training_arguments,
    example_parser,
    main_guard,
    positive_int,
    training_config,
)
from fieldguide.lab.experiment import (
    Presets,
    Technique,
    plot_losses,
    real_model_training,
    run_technique,
)
from fieldguide.lab.loading import load_model, parse_and_load, save_if_asked
from fieldguide.lab.metrics import exact_match_outcomes
from fieldguide.lab.tasks import InstructionExample, instruction_task
from fieldguide.lab.training import TrainConfig

PRESETS = Presets(
    tiny=TrainConfig(
        max_steps=400,  # 400 steps of 32 chats: between 8 and 9 passes over the 1,500 examples
        batch_size=32,  # chats per step
        learning_rate=2e-3,  # peak rate; the pretraining rate (3e-3) learns this task less reliably
        warmup_steps=30,  # ramp up gently: the first gradients on an unfamiliar format are large
    ),
    real=real_model_training(max_steps=300),  # see fieldguide.lab.experiment
)


def instruction_following(heldout: list[InstructionExample]) -> Technique:
    """Full fine-tuning on the instruction task's chats, scored by exact match on ``heldout``."""
    return Technique(
        data=lambda tokenizer: encode_instructions(tokenizer, instruction_task().train),
        score=lambda model, tokenizer: exact_match_outcomes(model, tokenizer, heldout),
    )


@cached  # the page's doctests and its figure share one run instead of training twice
def run_tutorial_finetune(seed: int = 0):
    """Load the tiny base model and fine-tune it on the instruction task's train split."""
    model, tokenizer = load_model("tiny")
    technique = instruction_following(instruction_task().heldout)
    return run_technique(technique, model, tokenizer, PRESETS.tiny, keep_model=True)


def loss_figure(ax) -> None:
    """The training loss of the tutorial's run, step by step."""
    run = run_tutorial_finetune()
    plot_losses(ax, {"training loss on the answers": run}, "Fine-tuning the tiny model on instructions")


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Fine-tune a model on the lab's instruction task, then save it.")
    add_training_arguments(parser, PRESETS)
    parser.add_argument(
        "--num-heldout", type=positive_int, default=150, help="held-out prompts to score (default: 150)"
    )
    add_chat_arguments(parser)
    args, model, tokenizer = parse_and_load(parser, argv)
    require_chat_template(tokenizer, args.chat_template)
    config = training_config(args, PRESETS)
    technique = instruction_following(instruction_task().heldout[: args.num_heldout])
    run = run_technique(technique, model, tokenizer, config, keep_model=args.output is not None)
    print(run.report("exact match"))
    save_if_asked(args.output, run.model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
