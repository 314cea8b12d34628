"""Pretraining the lab's tiny base model: a Llama-architecture decoder, from random weights.

This is next-token prediction on the synthetic corpus, the same objective every LLM is
pretrained with, at a size that takes about a minute on two CPU cores. The result is a base
model in the usual sense: it continues text, knows the corpus's facts, and has never seen a
chat, an instruction or a label, which is what the fine-tuning pages then teach it.

The model is built the first time a page or a command asks for it, then cached on disk under
a hash of the recipe's source, so editing the recipe builds a new model instead of loading a
stale one. ``python -m fieldguide.foundations.what_are_llms --output DIR`` pretrains one
from the command line.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from fieldguide.lab.cli import quiet_unless_terminal
from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import pack_texts, pad_batch
from fieldguide.lab.tokenizer import train_tokenizer
from fieldguide.lab.training import TrainConfig, seed_everything, train


@dataclass(frozen=True)
class PretrainConfig:
    num_stories: int = 6000  # stories in the pretraining corpus
    vocab_size: int = 512  # upper bound for BPE; the corpus saturates it a little below
    hidden_size: int = 128  # width of the residual stream, d_model
    num_hidden_layers: int = 2  # decoder blocks; in our runs two learned this corpus faster than four
    num_attention_heads: int = 4  # query heads per block
    num_key_value_heads: int = 2  # key/value heads (grouped-query attention, as Llama 2 70B)
    intermediate_size: int = 344  # SwiGLU hidden width, about 8/3 of hidden_size as in Llama
    block_size: int = 128  # tokens per training sequence, and the model's context length
    # The spread of the initial weights. transformers' default, 0.02, suits widths in the
    # thousands; at width 128 it left attention uniform through pretraining (every position
    # weighed alike), and the model never learned to copy from its context. About
    # 1/sqrt(hidden_size) lets attention pick positions from the start.
    initializer_range: float = 0.08
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=600, batch_size=16, learning_rate=3e-3, warmup_steps=30, weight_decay=0.1, log_every=100
        )
    )  # train.seed is the one seed: the corpus, the initial weights and the data order


def build_model(config: PretrainConfig, tokenizer: PreTrainedTokenizerBase, architecture=None):
    """A randomly initialised causal LM: the tiny Llama shape, or ``architecture``'s.

    ``architecture`` is a transformers configuration (say, a real model's ``AutoConfig``);
    its vocabulary and special tokens are replaced by the lab tokenizer's.
    """
    seed_everything(config.train.seed)  # the initial weights
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
        initializer_range=config.initializer_range,
        tie_word_embeddings=True,  # one matrix embeds tokens and scores them, as in GPT-2
        **special,
    )
    return LlamaForCausalLM(llama_config)


def pretrain(config: PretrainConfig, device: str = "cpu", architecture=None):
    """Build the corpus and tokenizer, then pretrain a fresh model on the corpus.

    Returns the model (in evaluation mode) and the tokenizer.
    """
    corpus = make_corpus(config.num_stories, seed=config.train.seed)
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
    recipe = json.dumps(asdict(config), indent=2, sort_keys=True, default=str)
    (directory / "pretrain_config.json").write_text(recipe)


# -- The cached tiny model ---------------------------------------------------------------------

# The source files that determine the tiny model's weights.
RECIPE_MODULES = ("corpus.py", "reviews.py", "tokenizer.py", "data.py", "training.py", "pretrain.py")


def cache_root() -> Path:
    """Where built models and runs are kept: ``$FIELD_GUIDE_CACHE``, else ``~/.cache/llm-finetuning-guide``."""
    default = Path.home() / ".cache" / "llm-finetuning-guide"
    return Path(os.environ.get("FIELD_GUIDE_CACHE", default))


def tiny_model_dir() -> Path:
    """The cache directory of the tiny model built by the current recipe's source."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in RECIPE_MODULES:
        digest.update((here / name).read_bytes())
    return cache_root() / f"tiny-llama-{digest.hexdigest()[:12]}"


def ensure_tiny_model() -> Path:
    """Pretrain and save the tiny model unless it is cached already; return its directory."""
    target = tiny_model_dir()
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A line before and after: the build or the test run that pays for this says why it waits.
    print(f"Pretraining the lab's tiny model into {target} (about a minute on two cores)...", file=sys.stderr)
    start = time.perf_counter()
    config = PretrainConfig()
    model, tokenizer = pretrain(config)
    seconds = time.perf_counter() - start
    # Save into a scratch directory, then rename: a reader never sees a half-written model,
    # and of two processes racing to build it, the second simply keeps the first's copy.
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    save(model, tokenizer, scratch, config)
    steps, batch = config.train.max_steps, config.train.batch_size * config.train.grad_accum_steps
    cost = {"seconds": seconds, "steps": steps, "tokens": steps * batch * config.block_size}
    (scratch / PRETRAINING_COST).write_text(json.dumps(cost, indent=2))
    try:
        scratch.rename(target)
    except OSError:
        shutil.rmtree(scratch)
    print(f"Pretrained the tiny model in {seconds:.0f} s.", file=sys.stderr)
    return target


# What the cached model's pretraining cost on the machine that built it: seconds (the corpus
# and the tokenizer included), optimizer steps, and tokens trained on (packed blocks: no padding).
PRETRAINING_COST = "pretraining_cost.json"


def pretraining_cost() -> dict:
    """The tiny model's pretraining cost, as measured when it was built (built now if it is not)."""
    return json.loads((ensure_tiny_model() / PRETRAINING_COST).read_text())
