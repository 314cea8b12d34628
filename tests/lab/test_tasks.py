"""The shared tasks: splits that share no example, balanced classes."""

import pytest

from fieldguide.lab.tasks import instruction_task, preference_task, sentiment_task


@pytest.mark.parametrize("task", [sentiment_task, instruction_task, preference_task])
def test_train_and_heldout_splits_share_no_example(task):
    split = task()
    assert split.train and split.heldout
    assert not set(split.train) & set(split.heldout)
    assert task() == split  # the same split every time


def test_sentiment_classes_are_balanced():
    labels = [ex.label for ex in sentiment_task().heldout]
    assert abs(sum(labels) / len(labels) - 0.5) < 0.1
