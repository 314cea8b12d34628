"""Shared fixtures: the cached tiny model, and a much smaller model for training tests."""

import os

import pytest

# Never reach for the Hugging Face Hub (nox sets the same; this makes a bare `pytest` behave
# alike). Built models go where the command lines keep them, so the tiny model is built once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.loading import load_model
from fieldguide.lab.pretrain import build_model
from fieldguide.lab.tokenizer import train_tokenizer
from lab_factories import micro_config
from package_venv import install_wheel_venv


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


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory):
    """The package as a reader installs it: its wheel with the examples' extra (and ipykernel)
    in a fresh venv. A ``package_venv.WheelVenv``: ``.python``, ``.bin``, ``.wheel``."""
    return install_wheel_venv(tmp_path_factory.mktemp("wheel-venv"))
