"""Shared fixtures: the cached tiny model, and a much smaller model for training tests."""

import os
from pathlib import Path

import pytest

# Never reach for the Hugging Face Hub, and keep built models in the checkout (nox sets the
# same; these defaults make a bare `pytest` behave alike).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FIELD_GUIDE_CACHE", str(Path(__file__).parents[1] / ".cache" / "models"))

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.loading import load_model
from fieldguide.lab.pretrain import build_model
from fieldguide.lab.tokenizer import train_tokenizer
from lab_factories import micro_config


@pytest.fixture(scope="session")
def tiny():
    """The lab's pretrained base model and its tokenizer (pretrained once, then cached)."""
    return load_model("tiny")


@pytest.fixture(scope="session")
def micro_tokenizer():
    return train_tokenizer(make_corpus(200, seed=0), vocab_size=512)


@pytest.fixture
def micro_model(micro_tokenizer):
    """A fresh, untrained one-layer Llama model; the same weights every time."""
    return build_model(micro_config(), micro_tokenizer)
