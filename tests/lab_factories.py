"""Small builders the lab's tests share (kept out of conftest.py, whose module name
another conftest.py, under tests/browser/, also uses)."""

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import pack_texts
from fieldguide.lab.experiment import Technique
from fieldguide.lab.metrics import text_losses
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
