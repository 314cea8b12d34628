"""Your first fine-tune: teach the lab's base model to follow instructions.

The tutorial page walks through the steps one at a time. This module holds the pieces it
reuses, so that the page's doctests and its loss-curve figure come from one and the same run.
From the command line it does the whole fine-tune, on the tiny model or any causal LM::

    python -m fieldguide.tutorial --output my-first-fine-tune
"""

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fieldguide.cli import (
    add_training_arguments,
    example_parser,
    main_guard,
    parse_and_load,
)
from fieldguide.data import encode_prompt_response
from fieldguide.loading import load_model
from fieldguide.metrics import exact_match
from fieldguide.tasks import InstructionExample, instruction_task
from fieldguide.training import TrainConfig, train

# Put before every answer, so that its first word is the same token as in the prompt: byte-level
# BPE spells " nut" as one token and "nut" at the start of a text as two ("nu", "t").
RESPONSE_PREFIX = " "


def tutorial_config(seed: int = 0) -> TrainConfig:
    """The settings of the tutorial's fine-tune: small enough for a laptop CPU."""
    return TrainConfig(
        max_steps=400,  # 400 steps of 32 chats: between 8 and 9 passes over the 1,500 examples
        batch_size=32,  # chats per step
        learning_rate=2e-3,  # peak rate; the pretraining rate (3e-3) learns this task less reliably
        warmup_steps=30,  # ramp up gently: the first gradients on an unfamiliar format are large
        seed=seed,  # the order of the examples, and so the exact run
    )


def encode_instructions(tokenizer: PreTrainedTokenizerBase, examples: list[InstructionExample]) -> list[dict]:
    """Each example as one chat whose labels mask the prompt, so the loss is on the answer only."""
    if not examples:
        raise ValueError("no examples to encode: the training set is empty")
    return [encode_prompt_response(tokenizer, ex.prompt, RESPONSE_PREFIX + ex.response) for ex in examples]


def finetune_on_instructions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[InstructionExample],
    config: TrainConfig,
) -> list[float]:
    """Full fine-tuning: train every parameter on the chats; return the loss of every step."""
    return train(model, encode_instructions(tokenizer, examples), config)


@dataclass
class FineTuneRun:
    model: PreTrainedModel  # the fine-tuned model, in evaluation mode
    losses: list[float]  # the training loss of every optimizer step
    seconds: float  # wall-clock time of the training alone


@functools.cache  # the page's doctests and its figure share one run instead of training twice
def run_tutorial_finetune(seed: int = 0) -> FineTuneRun:
    """Load the tiny base model and fine-tune it on the instruction task's train split."""
    model, tokenizer = load_model("tiny")
    start = time.perf_counter()
    losses = finetune_on_instructions(model, tokenizer, instruction_task().train, tutorial_config(seed))
    return FineTuneRun(model, losses, time.perf_counter() - start)


def plot_losses(ax) -> None:
    """The training loss of the tutorial's run, step by step, on a matplotlib ``Axes``."""
    losses = run_tutorial_finetune().losses
    ax.plot(range(1, len(losses) + 1), losses, label="training loss on the answers")
    ax.set_yscale("log")  # the first steps start near 10 nats; the interesting part is below 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("Fine-tuning the tiny model on instructions")
    ax.legend()


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Fine-tune a model on the lab's instruction task, then save it.")
    defaults = tutorial_config()
    add_training_arguments(parser, defaults, batch_size=False)
    parser.add_argument("--output", type=Path, help="directory to save the fine-tuned model in (safetensors)")
    args, model, tokenizer = parse_and_load(parser, argv)
    config = tutorial_config(args.seed)
    config.max_steps, config.learning_rate = args.steps, args.learning_rate
    config.warmup_steps = min(config.warmup_steps, args.steps // 2)
    task = instruction_task()
    print(f"exact match before: {exact_match(model, tokenizer, task.heldout):.3f}")
    losses = finetune_on_instructions(model, tokenizer, task.train, config)
    print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"exact match after:  {exact_match(model, tokenizer, task.heldout):.3f}")
    if args.output is not None:
        model.save_pretrained(args.output)  # safetensors, loadable with --model <output>
        tokenizer.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main_guard(main)
