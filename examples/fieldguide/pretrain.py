"""Pretraining the lab's tiny base model: a Llama-architecture decoder, from random weights.

This is next-token prediction on the synthetic corpus, the same objective every LLM is
pretrained with, at a size that takes under a minute on two CPU cores. The result is a base
model in the usual sense: it continues text, knows the corpus's facts, and has never seen a
chat, an instruction or a label, which is what the fine-tuning pages then teach it.

Run it from the command line to build and save one::

    python -m fieldguide.pretrain --output tiny-llama
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from fieldguide.cli import example_parser, main_guard, positive_int, require_device
from fieldguide.corpus import make_corpus
from fieldguide.data import pack_texts, pad_batch
from fieldguide.loading import TINY, quiet_unless_terminal
from fieldguide.tokenizer import train_tokenizer
from fieldguide.training import TrainConfig, train


@dataclass
class PretrainConfig:
    num_stories: int = 4000  # stories in the pretraining corpus
    vocab_size: int = 512  # upper bound for BPE; the corpus saturates it a little below
    hidden_size: int = 128  # width of the residual stream, d_model
    num_hidden_layers: int = 2  # decoder blocks; in our runs two learned this corpus faster than four
    num_attention_heads: int = 4  # query heads per block
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention, as Llama 2 70B)
    intermediate_size: int = 344  # SwiGLU hidden width, about 8/3 of hidden_size as in Llama
    block_size: int = 128  # tokens per training sequence, and the model's context length
    seed: int = 0  # one seed for the corpus, the initial weights and the data order
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=500, batch_size=16, learning_rate=3e-3, warmup_steps=30, weight_decay=0.1
        )
    )


def build_model(config: PretrainConfig, tokenizer: PreTrainedTokenizerBase, architecture=None):
    """A randomly initialised causal LM: the tiny Llama shape, or ``architecture``'s.

    ``architecture`` is a transformers configuration (say, a real model's ``AutoConfig``);
    its vocabulary and special tokens are replaced by the lab tokenizer's.
    """
    torch.manual_seed(config.seed)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if architecture is not None:
        architecture.update({"vocab_size": len(tokenizer), **special})
        return AutoModelForCausalLM.from_config(architecture)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.block_size,
        tie_word_embeddings=True,  # one matrix embeds tokens and scores them, as in GPT-2
        **special,
    )
    return LlamaForCausalLM(llama_config)


def pretrain(config: PretrainConfig, device: str = "cpu", architecture=None):
    """Build the corpus and tokenizer, then pretrain a fresh model on the corpus.

    Returns the model (in evaluation mode) and the tokenizer.
    """
    corpus = make_corpus(config.num_stories, seed=config.seed)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    model = build_model(config, tokenizer, architecture).to(device)
    blocks = pack_texts(tokenizer, corpus, config.block_size)
    train(model, blocks, config.train, collate=lambda ex: pad_batch(ex, tokenizer.pad_token_id))
    return model, tokenizer


def save(model, tokenizer, directory: Path, config: PretrainConfig) -> None:
    """Save in the Hugging Face layout, weights as safetensors, so ``from_pretrained`` loads it."""
    quiet_unless_terminal()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "pretrain_config.json").write_text(_to_json(config))


def _to_json(config: PretrainConfig) -> str:
    return json.dumps(asdict(config), indent=2, sort_keys=True, default=str)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Pretrain a base model from random weights on the lab's corpus and save it.",
        model_help=f"the architecture: {TINY!r} (default) for the lab's shape, or a local directory or "
        "Hugging Face model id whose configuration is used (its weights are not loaded)",
    )
    parser.add_argument("--output", type=Path, required=True, help="directory to save the model in")
    parser.add_argument(
        "--steps", type=positive_int, default=PretrainConfig().train.max_steps, help="optimizer steps"
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar"
    )
    args = parser.parse_args(argv)
    require_device(parser, args.device)
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"argument --output: {args.output} exists and is not empty")
    architecture = None
    if args.model != TINY:  # a real model's shape, trained from scratch on the lab's corpus
        try:
            architecture = AutoConfig.from_pretrained(args.model)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            parser.error(f"argument --model: cannot load a configuration from {args.model!r}: {reason}")
    config = PretrainConfig(seed=args.seed)
    config.train.max_steps, config.train.progress = args.steps, args.progress
    start = time.perf_counter()
    model, tokenizer = pretrain(config, args.device, architecture)
    seconds = time.perf_counter() - start
    save(model, tokenizer, args.output, config)
    print(f"pretrained {model.num_parameters():,} parameters in {seconds:.1f} s; saved to {args.output}")


if __name__ == "__main__":
    main_guard(main)
