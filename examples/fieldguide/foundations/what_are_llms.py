"""Causal self-attention from scratch: the page "What are LLMs?", equation (eq-attention), in code.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V,  with M_ij = -inf where j > i

``causal_attention`` is that line for one batch of heads; ``llama_attention`` plugs it into a
transformers Llama model, which shows that it is the attention the lab's tiny model computes.

From the command line, the page's other subject: pretraining a base model from random weights
on the lab's corpus, in the tiny shape or in a real model's::

    fieldguide what-are-llms --output my-tiny-model
"""

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from fieldguide.lab.cli import (
    TINY,
    add_training_arguments,
    example_parser,
    main_guard,
    require_device,
    require_new_output,
    training_config,
)
from fieldguide.lab.experiment import Presets, real_model_training
from fieldguide.lab.loading import ModelLoadError, load_config
from fieldguide.lab.pretrain import PretrainConfig, pretrain, save


def causal_mask(T: int) -> torch.Tensor:
    """The (T, T) boolean mask behind M: True where position i may look at position j <= i."""
    # Lower triangle, diagonal included: a token sees itself and everything before it, never after.
    return torch.ones(T, T, dtype=torch.bool).tril()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + M) V for ``q``, ``k``, ``v`` of shape (B, H, T, d)."""
    T, d = q.shape[-2], q.shape[-1]
    # How well each query matches each key. Dividing by sqrt(d) keeps the scores' spread near 1
    # whatever the head size, so the softmax does not saturate on one key.
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, T, T)
    # "+ M": -inf above the diagonal, so exp(-inf) = 0 and no weight goes to a later token.
    scores = scores.masked_fill(~causal_mask(T).to(q.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (B, H, T, T); each row sums to 1
    return weights @ v  # (B, H, T, d): per position, a weighted average of the values


def llama_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """``causal_attention`` behind transformers' attention interface, for a Llama model.

    Register it with ``AttentionInterface.register("fieldguide", llama_attention)`` and load a
    model with ``attn_implementation="fieldguide"``. It covers one forward pass over whole,
    unpadded sequences: no key/value cache, no padding mask, no dropout.
    """
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("llama_attention needs a whole sequence at once (no key/value cache)")
    # Grouped-query attention: each key/value head is shared by `groups` query heads.
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, H_kv, T, d) -> (B, H, T, d)
    value = value.repeat_interleave(groups, dim=1)  # (B, H, T, d)
    output = causal_attention(query, key, value)  # (B, H, T, d)
    return output.transpose(1, 2).contiguous(), None  # (B, T, H, d), the layout transformers expects


# Pretraining a model from scratch: the tiny model's recipe, or for a real model's shape the
# peak learning rate of Llama 2's pretraining at 7B and 13B (3e-4), bf16 and checkpointing.
PRESETS = Presets(
    tiny=PretrainConfig().train,
    real=real_model_training(
        max_steps=500, batch_size=16, grad_accum_steps=1, learning_rate=3e-4, weight_decay=0.1
    ),
)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Pretrain a base model from random weights on the lab's corpus and save it.",
        model_help=f"the architecture: {TINY!r} (default) for the lab's shape, or a local directory or "
        "Hugging Face model id whose configuration is used (its weights are not loaded)",
    )
    parser.add_argument("--output", type=Path, required=True, help="directory to save the model in")
    add_training_arguments(parser, PRESETS)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: only when stderr is a terminal)",
    )
    args = parser.parse_args(argv)
    require_device(parser, args.device)
    require_new_output(parser, args.output)
    architecture = None
    if args.model != TINY:  # a real model's shape, trained from scratch on the lab's corpus
        try:
            architecture = load_config(args.model)
        except ModelLoadError as error:
            parser.error(f"argument --model: {error}")
    config = PretrainConfig(train=replace(training_config(args, PRESETS), progress=args.progress))
    start = time.perf_counter()
    model, tokenizer = pretrain(config, args.device, architecture)
    seconds = time.perf_counter() - start
    save(model, tokenizer, args.output, config)
    print(f"pretrained {model.num_parameters():,} parameters in {seconds:.1f} s; saved to {args.output}")


if __name__ == "__main__":
    main_guard(main)
