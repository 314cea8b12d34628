"""Instruction tuning (supervised fine-tuning, SFT): teach a base model to answer in a chat.

The recipe is next-token prediction again, on (prompt, response) pairs rendered with the chat
template, with two changes: the loss is taken over the response tokens only, and every
response ends with the token that closes a turn, so the model learns to stop. Packing several examples into one row
saves the compute spent on padding. Run it on any causal LM::

    python -m fieldguide.whole_model.instruction_tuning --model tiny --max-steps 300
"""

import argparse
import functools

import torch

from fieldguide.lab.cache import cached
from fieldguide.lab.chat import (
    chat_prompt_ids,
    encode_instructions,
    end_of_turn_id,
    require_chat_template,
    response_prefix,
)
from fieldguide.lab.cli import (
    add_chat_arguments,
    add_training_arguments,
    example_parser,
    main_guard,
    training_config,
)
from fieldguide.lab.data import pad_batch
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
from fieldguide.lab.trl_arguments import trl_arguments

MAX_LENGTH = 128  # longest tokenized example, and longest packed row: the tiny model's context

PRESETS = Presets(
    # 300 steps of 32 chats at the rate the tiny model was pretrained at; a short warm-up,
    # since the chat tokens' embeddings start untrained.
    tiny=TrainConfig(max_steps=300, batch_size=32, learning_rate=3e-3, warmup_steps=10),
    real=real_model_training(max_steps=300),  # see fieldguide.lab.experiment
)


# -- Packing: several examples per row, each blind to the others ------------------------------


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing into rows of at most ``max_length`` tokens.

    ``position_ids`` restart at 0 for every example: transformers reads a restart as a
    sequence boundary and gives each example its own causal mask (block-diagonal attention).
    """
    rows: list[list[dict]] = []
    free: list[int] = []  # tokens still free in each row
    for ex in sorted(examples, key=lambda ex: len(ex["input_ids"]), reverse=True):
        size = len(ex["input_ids"])
        fits = [i for i, room in enumerate(free) if room >= size]
        if fits:  # the fullest row it fits in, so rows end nearly full
            best = min(fits, key=lambda i: free[i])
            rows[best].append(ex)
            free[best] -= size
        else:
            rows.append([ex])
            free.append(max_length - size)
    return [
        {
            "input_ids": [t for ex in row for t in ex["input_ids"]],
            "labels": [t for ex in row for t in ex["labels"]],
            "position_ids": [p for ex in row for p in range(len(ex["input_ids"]))],
        }
        for row in rows
    ]


def collate_packed(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into (B, T) tensors; no attention mask, position ids instead."""
    batch = pad_batch(rows, pad_token_id)
    width = batch["input_ids"].shape[1]
    # The padding gets positions 0, 1, ... too: a sequence of its own, and its labels are masked.
    batch["position_ids"] = torch.tensor(
        [row["position_ids"] + list(range(width - len(row["position_ids"]))) for row in rows]
    )
    del batch["attention_mask"]  # a 2D mask would switch off the per-example causal masks
    return batch


def padding_fraction(batches: list[dict], pad_token_id: int) -> float:
    """Share of the token positions computed that are padding (``pad_token_id`` is pad only)."""
    pads = sum(int((b["input_ids"] == pad_token_id).sum()) for b in batches)
    return pads / sum(b["input_ids"].numel() for b in batches)


# -- Training and measuring ----------------------------------------------------------------


def instruction_tuning(
    heldout: list[InstructionExample], pad_token_id: int, packing: bool = False
) -> Technique:
    """Full fine-tuning on chats, loss on the answers; scored by exact match on ``heldout``."""

    def data(tokenizer) -> list[dict]:
        chats = encode_instructions(tokenizer, instruction_task().train, MAX_LENGTH)
        return pack_examples(chats, MAX_LENGTH) if packing else chats

    return Technique(
        data=data,
        score=lambda model, tokenizer: exact_match_outcomes(model, tokenizer, heldout),
        # Packed rows carry position ids instead of an attention mask; the lab's loss passes them on.
        collate=functools.partial(collate_packed, pad_token_id=pad_token_id) if packing else None,
    )


@cached  # the page's doctests and its figure share one run
def run_instruction_tuning(packing: bool = False):
    """Instruction-tune a fresh copy of the tiny model; keep the model to look at its answers."""
    model, tokenizer = load_model("tiny")
    technique = instruction_tuning(instruction_task().heldout, tokenizer.pad_token_id, packing)
    return run_technique(technique, model, tokenizer, PRESETS.tiny, keep_model=True)


def loss_figure(ax) -> None:
    """The training loss of the page's run."""
    plot_losses(ax, {"loss on the answers": run_instruction_tuning()}, "Instruction tuning the tiny model")


# -- The same fine-tune with TRL ------------------------------------------------------------


def check_chat_template(tokenizer) -> None:
    """Refuse a template whose ``{% generation %}`` span leaves out the token that closes the turn.

    TRL's ``assistant_only_loss`` keeps labels only inside that span. The closing token (EOS
    for the lab's model, read off the template by ``end_of_turn_id``) must be inside it too, or
    it is never a target and the model never learns to stop.
    """
    end = end_of_turn_id(tokenizer)  # refuses a template that closes the turn with no special token
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    if not any(mask):
        raise ValueError(
            "the chat template marks no assistant tokens with {% generation %} ... {% endgeneration %}, "
            "so an assistant-only loss would keep no label at all: wrap each assistant message and the "
            "token that closes it in those markers"
        )
    start = len(chat_prompt_ids(tokenizer, "hi"))  # where the assistant's answer begins
    closing = next((i for i in range(start, len(ids)) if ids[i] == end), None)
    if closing is None:
        raise ValueError("the rendered chat never closes the assistant's turn")
    if not mask[closing]:
        raise ValueError(
            f"the chat template closes an assistant turn with {tokenizer.convert_ids_to_tokens(end)!r} "
            "outside its {% generation %} span: under TRL's assistant_only_loss that token would get no "
            "label, and a model fine-tuned on it would never learn to stop; move {% endgeneration %} "
            "after it"
        )


def trl_trainer(
    model,
    tokenizer,
    examples: list[InstructionExample],
    config: TrainConfig,
    output_dir: str,
    packing: bool = False,
):
    """TRL's ``SFTTrainer`` set up like ``instruction_tuning``: same data, loss on the answer only."""
    check_chat_template(tokenizer)  # TRL itself only logs a warning when the end of a turn is not trained
    import trl  # imported here: TRL is heavy, and only this function needs it
    from datasets import Dataset

    chats = [
        {"messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": response}]}
        for ex in examples
        for response in [response_prefix(tokenizer) + ex.response]
    ]
    args = trl.SFTConfig(
        **trl_arguments(config, output_dir),  # the batch, steps, rate and seed of ``config``
        assistant_only_loss=True,  # labels only inside {% generation %}: the answer and its EOS
        max_length=MAX_LENGTH,
        packing=packing,
        warmup_steps=config.warmup_steps,
    )
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(chats), processing_class=tokenizer
    )


# -- Command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Instruction-tune a model on the lab's instruction task; print exact match.")
    add_training_arguments(parser, PRESETS)
    parser.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=False, help="pack chats into full rows"
    )
    add_chat_arguments(parser)
    args, model, tokenizer = parse_and_load(parser, argv)
    require_chat_template(tokenizer, args.chat_template)
    technique = instruction_tuning(instruction_task().heldout, tokenizer.pad_token_id, args.packing)
    config = training_config(args, PRESETS)
    run = run_technique(technique, model, tokenizer, config, keep_model=args.output is not None)
    print(run.report("exact match"))
    save_if_asked(args.output, run.model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
