"""Full fine-tuning: our classification head against transformers', the data, the errors."""

import copy

import pytest
import torch

from fieldguide.lab.data import IGNORE_INDEX
from fieldguide.lab.loading import load_model
from fieldguide.whole_model.full_fine_tuning import (
    causal_lm_training_set,
    classification_batch,
    classification_loss,
    classifier_from_causal_lm,
    main,
    training_memory_bytes,
    transformers_classifier,
)


@pytest.fixture(scope="module")
def head_pair(tiny):
    """Our classifier and transformers' LlamaForSequenceClassification, with one head."""
    model, _ = tiny
    theirs = transformers_classifier()
    ours = classifier_from_causal_lm(copy.deepcopy(model))
    with torch.no_grad():
        ours.score.weight.copy_(theirs.score.weight)
    return ours, theirs


def _batch(tokenizer, texts, labels, left_pad=False):
    examples = [
        {"input_ids": tokenizer(t)["input_ids"], "labels": y} for t, y in zip(texts, labels, strict=True)
    ]
    batch = classification_batch(examples, tokenizer.pad_token_id)
    if left_pad:  # move every row's padding to the front
        for key in ("input_ids", "attention_mask"):
            batch[key] = torch.stack(
                [
                    torch.roll(row, int((m == 0).sum()))
                    for row, m in zip(batch[key], batch["attention_mask"], strict=True)
                ]
            )
    return batch


PARITY_CASES = [
    # (texts, labels, left padding)
    (["the pie is stale and dry."], [0], False),
    (["the cake is warm.", "the soup is cold and bland and burnt."], [1, 0], False),
    (
        ["the fox lives in the forest. the fox is happy.", "the nut is ripe.", "the corn is soggy."],
        [1, 1, 0],
        False,
    ),
    (["the cake is warm.", "the soup is cold and bland and burnt."], [1, 0], True),
]


@pytest.mark.parametrize(("texts", "labels", "left_pad"), PARITY_CASES)
def test_our_head_matches_transformers_sequence_classification(tiny, head_pair, texts, labels, left_pad):
    _, tokenizer = tiny
    ours, theirs = head_pair
    batch = _batch(tokenizer, texts, labels, left_pad)
    with torch.no_grad():
        reference = theirs(**batch)
        logits = ours(batch["input_ids"], batch["attention_mask"])
        loss_sum, count = classification_loss(ours, batch)
    torch.testing.assert_close(logits, reference.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_sum / count, reference.loss, atol=1e-5, rtol=0)


def test_gradients_of_the_head_match_transformers(tiny, head_pair):
    _, tokenizer = tiny
    ours, theirs = (copy.deepcopy(m) for m in head_pair)
    batch = _batch(tokenizer, *PARITY_CASES[2][:2])
    loss_sum, count = classification_loss(ours, batch)
    (loss_sum / count).backward()
    theirs(**batch).loss.backward()
    torch.testing.assert_close(ours.score.weight.grad, theirs.score.weight.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("fraction", "expected_share"), [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5)])
def test_replay_makes_up_the_asked_share_of_the_training_set(tiny, fraction, expected_share):
    _, tokenizer = tiny
    dataset = causal_lm_training_set(tokenizer, replay_fraction=fraction)
    replayed = sum(IGNORE_INDEX not in ex["labels"] for ex in dataset)  # blocks carry no mask
    assert replayed / len(dataset) == pytest.approx(expected_share, abs=0.01)


@pytest.mark.parametrize(("num_params", "expected"), [(1, 16), (422_400, 6_758_400), (7_000_000_000, 112e9)])
def test_training_memory_is_sixteen_bytes_per_parameter(num_params, expected):
    assert training_memory_bytes(num_params) == expected


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_a_replay_fraction_outside_zero_to_one_is_refused(tiny, bad):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match=r"replay fraction must be in \[0, 1\)"):
        causal_lm_training_set(tokenizer, replay_fraction=bad)


def test_training_memory_of_no_parameters_is_refused():
    with pytest.raises(ValueError, match="num_params"):
        training_memory_bytes(0)


def test_command_line_reports_accuracy_before_and_after_and_saves(tiny, tmp_path, capsys):
    main(["--max-steps", "2", "--batch-size", "4", "--output", str(tmp_path / "tuned")])
    out = capsys.readouterr().out
    assert "trainable parameters   424,576 of 424,576" in out
    assert "sentiment accuracy before" in out and "sentiment accuracy after" in out
    assert "perplexity" in out and "->" in out
    assert f"saved to {tmp_path / 'tuned'}" in out
    assert changed_weights(tmp_path / "tuned", tiny[0])  # what was trained, not the base model


def test_command_line_refuses_a_replay_fraction_of_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--max-steps", "1", "--replay", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --replay: must be at least 0 and below 1, got 1" in err


def changed_weights(directory, base) -> list[str]:
    """The weights of the model saved in ``directory`` that differ from ``base``'s."""
    saved, _ = load_model(directory)
    return [name for name, weight in saved.state_dict().items() if not weight.equal(base.state_dict()[name])]
