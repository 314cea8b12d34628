"""Instruction tuning (supervised fine-tuning, SFT): teach a base model to answer in a chat.

The recipe is next-token prediction again, on (prompt, response) pairs rendered with the chat
template, with two changes: the loss is taken over the response tokens only, and every
response ends with EOS so the model learns to stop. Packing several examples into one row
saves the compute spent on padding. Run it on any causal LM::

    python -m fieldguide.sft --model tiny --steps 300
"""

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fieldguide.cli import (
    add_training_arguments,
    example_parser,
    main_guard,
    parse_and_load,
)
from fieldguide.data import IGNORE_INDEX, chat_prompt_ids, encode_prompt_response, pad_batch
from fieldguide.metrics import exact_match, generate_responses
from fieldguide.tasks import InstructionExample, instruction_task
from fieldguide.training import TrainConfig, train


@dataclass(frozen=True)
class SFTConfig:
    max_steps: int = 300  # optimizer steps
    batch_size: int = 32  # examples (or packed rows) per step
    learning_rate: float = 3e-3  # peak AdamW rate, the rate the tiny model was pretrained at
    warmup_steps: int = 10  # linear warm-up: the chat tokens' embeddings start untrained
    max_length: int = 128  # longest tokenized example (and packed row); the tiny model's context
    packing: bool = False  # several examples per row, with position ids restarting at each
    response_prefix: str = " "  # put before every response, so its first word is one token (see page)
    seed: int = 0  # the order in which examples are visited


# -- Checks: data that would silently teach the wrong thing ----------------------------------


def check_chat_template(tokenizer) -> None:
    """Raise ValueError unless the chat template ends an assistant turn with EOS.

    A model learns to stop only if the token generation stops at is among its targets.
    """
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = tokenizer.apply_chat_template(chat, return_dict=True)["input_ids"]
    assistant_turn = ids[len(chat_prompt_ids(tokenizer, "hi")) :]
    if tokenizer.eos_token_id not in assistant_turn:
        raise ValueError(
            f"the chat template never emits EOS ({tokenizer.eos_token!r}) after an assistant turn: "
            "a model fine-tuned on it would never learn to stop"
        )


def encode_chat_examples(tokenizer, examples: list[InstructionExample], config: SFTConfig) -> list[dict]:
    """Chat-format each example with the lab's encoder; refuse examples that teach nothing."""
    encoded = []
    for index, ex in enumerate(examples):
        full = encode_prompt_response(tokenizer, ex.prompt, config.response_prefix + ex.response)
        item = {key: value[: config.max_length] for key, value in full.items()}  # keep the start
        if all(label == IGNORE_INDEX for label in item["labels"]):
            raise ValueError(
                f"example {index} ({ex.prompt[:40]!r}): every label is masked, since the prompt fills "
                f"max_length={config.max_length}; nothing of its response would be learned"
            )
        if item["labels"][-1] != tokenizer.eos_token_id:
            raise ValueError(
                f"example {index} ({ex.prompt[:40]!r}): its response is cut at max_length="
                f"{config.max_length} before EOS, which would teach the model not to stop"
            )
        encoded.append(item)
    return encoded


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


def packed_lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """``causal_lm_loss`` for packed rows: position ids in place of the attention mask."""
    # Without a cache: transformers looks for restarting positions only when it builds none.
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits  # (B, T, V)
    targets = batch["labels"][:, 1:].flatten()  # (B*(T-1),): an example's first label is masked,
    # so no example is ever trained to predict the start of the next one.
    predictions = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    loss_sum = F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((targets != IGNORE_INDEX).sum())


def padding_fraction(batches: list[dict], pad_token_id: int) -> float:
    """Share of the token positions computed that are padding (``pad_token_id`` is pad only)."""
    pads = sum(int((b["input_ids"] == pad_token_id).sum()) for b in batches)
    return pads / sum(b["input_ids"].numel() for b in batches)


# -- Training and measuring ----------------------------------------------------------------


def instruction_tune(model, tokenizer, examples: list[InstructionExample], config: SFTConfig) -> list[float]:
    """Fine-tune every weight of ``model`` on ``examples``; return the loss of every step."""
    check_chat_template(tokenizer)
    data = encode_chat_examples(tokenizer, examples, config)
    train_config = TrainConfig(
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
    )
    if not config.packing:  # the lab's loss and padding collator, unchanged
        return train(model, data, train_config)
    rows = pack_examples(data, config.max_length)
    collate = lambda batch: collate_packed(batch, tokenizer.pad_token_id)
    return train(model, rows, train_config, loss_fn=packed_lm_loss, collate=collate)


@dataclass
class SFTResult:
    exact_match_before: float  # held-out instruction exact match of the base model
    exact_match_after: float
    answers_before: list[str]  # greedy answers to the first few held-out prompts
    answers_after: list[str]
    losses: list[float] = field(repr=False)  # the training loss of every step
    seconds: float = 0.0  # wall-clock time of the training alone


def finetune_and_score(model, tokenizer, config: SFTConfig, num_shown: int = 3) -> SFTResult:
    """Score ``model`` on held-out instructions, instruction-tune it in place, score it again."""
    task = instruction_task()
    shown = [ex.prompt for ex in task.heldout[:num_shown]]
    before = exact_match(model, tokenizer, task.heldout)
    answers_before = generate_responses(model, tokenizer, shown)
    start = time.perf_counter()
    losses = instruction_tune(model, tokenizer, task.train, config)
    seconds = time.perf_counter() - start
    after = exact_match(model, tokenizer, task.heldout)
    return SFTResult(
        before, after, answers_before, generate_responses(model, tokenizer, shown), losses, seconds
    )


# -- The same fine-tune with TRL ------------------------------------------------------------


def trl_trainer(model, tokenizer, examples: list[InstructionExample], config: SFTConfig, output_dir: str):
    """TRL's ``SFTTrainer`` set up like ``instruction_tune``: same data, loss on the answer only."""
    import trl  # imported here: TRL is heavy, and only this function needs it
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    if not sys.stderr.isatty():  # TRL maps the data set with progress bars; keep logs clean
        disable_progress_bar()

    chats = [
        {"messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": response}]}
        for ex in examples
        for response in [config.response_prefix + ex.response]
    ]
    args = trl.SFTConfig(
        output_dir=output_dir,
        assistant_only_loss=True,  # labels only inside {% generation %}: the answer and its EOS
        max_length=config.max_length,
        packing=config.packing,
        per_device_train_batch_size=config.batch_size,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        # TRL turns gradient checkpointing on by default; a model this small has no need of it.
        gradient_checkpointing=None,
        activation_checkpointing=False,
    )
    return trl.SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(chats), processing_class=tokenizer
    )


# -- Command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Instruction-tune a model on the lab's instruction task; print exact match.")
    defaults = SFTConfig()
    add_training_arguments(parser, defaults)
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=False, help="pack rows")
    args, model, tokenizer = parse_and_load(parser, argv)
    config = SFTConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        packing=args.packing,
        seed=args.seed,
    )
    result = finetune_and_score(model, tokenizer, config)
    print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    print(f"exact match before: {result.exact_match_before:.3f}")
    print(f"exact match after:  {result.exact_match_after:.3f} ({result.seconds:.1f} s of training)")


if __name__ == "__main__":
    main_guard(main)
