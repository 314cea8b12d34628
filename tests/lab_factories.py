"""Small builders the lab's tests share (kept out of conftest.py, whose module name
another conftest.py, under tests/browser/, also uses)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import pack_texts
from fieldguide.lab.experiment import Technique
from fieldguide.lab.metrics import text_losses
from fieldguide.lab.preferences import alignment_task
from fieldguide.lab.pretrain import PretrainConfig
from fieldguide.lab.training import TrainConfig


def micro_config(**train_overrides) -> PretrainConfig:
    """A pretraining recipe small enough that a test can run it several times in seconds."""
    train = TrainConfig(max_steps=6, batch_size=4, learning_rate=3e-3, progress=False, **train_overrides)
    return PretrainConfig(
        num_stories=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, block_size=32, train=train
    )


# A short run of plain next-token prediction, for the harness's and the cache's tests.
CONFIG = TrainConfig(max_steps=8, batch_size=4, learning_rate=1e-2, progress=False)


def language_modelling(tokenizer) -> Technique:
    """Plain next-token prediction on stories, scored by each held-out story's loss."""
    heldout = make_corpus(12, seed=99)
    return Technique(
        data=lambda tokenizer: pack_texts(tokenizer, make_corpus(60, seed=0), block_size=32),
        score=lambda model, tokenizer: text_losses(model, tokenizer, heldout),
    )


# Small enough to run and train in milliseconds, with grouped-query attention as in the lab's
# tiny model.
RANDOM_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def random_llama(seed: int = 0, vocab_size: int = 64, **shape) -> LlamaForCausalLM:
    """A random two-layer Llama; ``shape`` overrides ``RANDOM_SHAPE``'s sizes."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**RANDOM_SHAPE, **shape})).eval()


def random_qwen2(seed: int = 0, vocab_size: int = 64) -> Qwen2ForCausalLM:
    """A random two-layer Qwen2: a Llama-like block whose query, key and value have biases."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **RANDOM_SHAPE)).eval()


def adamw_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> None:
    """A few AdamW steps of next-token prediction on ``ids``: what the parity tests give ours
    and the library's model alike before comparing their weights."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def padded_batch(seed: int = 0) -> dict:
    """Three rows of 10 token ids for a random model's tests, the last one right-padded by 3
    (its mask 0 there): a soft prompt's or a prefix's mask must be lengthened for it."""
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def small_alignment_task():
    """The lab's alignment task cut to 8 training pairs and 4 held-out requests and pairs, for
    a command-line test that trains for two steps."""
    task = alignment_task()
    return type(task)(
        requests=type(task.requests)(train=task.requests.train, heldout=task.requests.heldout[:4]),
        demonstrations=task.demonstrations,
        pairs=type(task.pairs)(train=task.pairs.train[:8], heldout=task.pairs.heldout[:4]),
    )
