"""Shared fixtures: the cached tiny model, and a much smaller model for training tests."""

import os
from pathlib import Path

import pytest

# Never reach for the Hugging Face Hub, and keep built models in the checkout (nox sets the
# same; these defaults make a bare `pytest` behave alike).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FIELD_GUIDE_CACHE", str(Path(__file__).parents[1] / ".cache" / "models"))

from fieldguide.corpus import make_corpus
from fieldguide.loading import load_model
from fieldguide.pretrain import PretrainConfig, build_model
from fieldguide.tokenizer import train_tokenizer
from fieldguide.training import TrainConfig


@pytest.fixture(scope="session")
def tiny():
    """The lab's pretrained base model and its tokenizer (pretrained once, then cached)."""
    return load_model("tiny")


def micro_config(**train_overrides) -> PretrainConfig:
    """A pretraining recipe small enough that a test can run it several times in seconds."""
    train = TrainConfig(max_steps=6, batch_size=4, learning_rate=3e-3, progress=False)
    for key, value in train_overrides.items():
        setattr(train, key, value)
    return PretrainConfig(
        num_stories=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, block_size=32, train=train
    )


@pytest.fixture(scope="session")
def micro_tokenizer():
    return train_tokenizer(make_corpus(200, seed=0), vocab_size=512)


@pytest.fixture
def micro_model(micro_tokenizer):
    """A fresh, untrained one-layer Llama model; the same weights every time."""
    return build_model(micro_config(), micro_tokenizer)
