"""Small builders the lab's tests share (kept out of conftest.py, whose module name
another conftest.py, under tests/browser/, also uses)."""

from fieldguide.lab.pretrain import PretrainConfig
from fieldguide.lab.training import TrainConfig


def micro_config(**train_overrides) -> PretrainConfig:
    """A pretraining recipe small enough that a test can run it several times in seconds."""
    train = TrainConfig(max_steps=6, batch_size=4, learning_rate=3e-3, progress=False, **train_overrides)
    return PretrainConfig(
        num_stories=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, block_size=32, train=train
    )
