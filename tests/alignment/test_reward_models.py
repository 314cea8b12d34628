"""Reward models: ours equal to transformers' classifier and to TRL's RewardTrainer loss."""

import copy

import pytest
import torch

from fieldguide.alignment.reward_models import (
    RewardModel,
    bradley_terry_loss,
    main,
    pair_outcomes,
    reward_loss,
    right_padded,
    to_transformers,
    trl_trainer,
)
from fieldguide.lab.loading import load_model
from fieldguide.lab.preferences import alignment_task, collate_pairs, encode_pair, sample_responses
from fieldguide.lab.training import TrainConfig
from model_families import save_family_model


def reward_model(family, tmp_path, seed=0):
    model, tokenizer = load_model("tiny" if family == "lab" else save_family_model(family, tmp_path / family))
    torch.manual_seed(seed)
    return RewardModel(copy.deepcopy(model)), tokenizer


@pytest.mark.parametrize("family", ["lab", "qwen2"])
def test_our_rewards_equal_transformers_sequence_classifier(family, tmp_path):
    ours, tokenizer = reward_model(family, tmp_path)
    theirs = to_transformers(ours).eval()
    pairs = alignment_task().pairs.heldout[:5]
    batch = collate_pairs([encode_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = theirs(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.squeeze(-1)
        assert torch.allclose(ours.eval()(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-5)


def test_where_padding_is_the_end_of_turn_transformers_reads_the_token_before_it(tmp_path):
    """Llama 3 ships no pad token, and the lab pads with EOS, which closes its turns: transformers'
    classifier takes the last token that is not padding, so it reads the reward one token early,
    off the answer's last word, where ours reads the end of the turn."""
    ours, tokenizer = reward_model("llama3", tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    theirs = to_transformers(ours).eval()
    batch = collate_pairs(
        [encode_pair(tokenizer, p) for p in alignment_task().pairs.heldout[:3]], tokenizer.pad_token_id
    )
    with torch.no_grad():
        expected = theirs(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.squeeze(-1)
        hidden = ours.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        one_early = batch["attention_mask"].sum(dim=1) - 2
        read_early = ours.score(hidden[torch.arange(len(hidden)), one_early]).squeeze(-1)
        assert torch.allclose(read_early, expected, atol=1e-5)
        assert not torch.allclose(
            ours.eval()(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-3
        )


CASES = [("lab", 1), ("lab", 4), ("qwen2", 1), ("qwen2", 3)]


@pytest.mark.parametrize(("family", "num_pairs"), CASES)
def test_our_loss_and_gradient_equal_trls_reward_trainer(family, num_pairs, tmp_path):
    ours, tokenizer = reward_model(family, tmp_path)
    theirs = to_transformers(copy.deepcopy(ours)).train()
    pairs = alignment_task().pairs.train[:num_pairs]
    trainer = trl_trainer(
        theirs, tokenizer, pairs, TrainConfig(max_steps=1, batch_size=num_pairs), str(tmp_path / "out")
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(num_pairs)])
    their_loss = trainer.compute_loss(theirs, batch)
    (their_grad,) = torch.autograd.grad(their_loss, [theirs.score.weight])
    total, count, _ = reward_loss(ours.train(), batch)
    our_loss = total / count
    (our_grad,) = torch.autograd.grad(our_loss, [ours.score.weight])
    assert abs(our_loss.item() - their_loss.item()) <= 1e-6 * max(1.0, abs(their_loss.item()))
    assert (our_grad - their_grad).abs().max() <= 1e-5 * their_grad.abs().max()


def test_trls_batches_are_ours_for_the_labs_chat_template(tmp_path):
    ours, tokenizer = reward_model("lab", tmp_path)
    pairs = alignment_task().pairs.heldout[:4]
    trainer = trl_trainer(
        to_transformers(ours), tokenizer, pairs, TrainConfig(batch_size=4), str(tmp_path / "out")
    )
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch = collate_pairs([encode_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], theirs["input_ids"])
    assert torch.equal(batch["attention_mask"], theirs["attention_mask"])


def test_the_loss_is_log_two_for_equal_rewards_and_falls_with_the_margin():
    rewards = torch.tensor([0.0, 1.0, 3.0])
    losses = bradley_terry_loss(rewards, torch.zeros(3))
    assert losses[0].item() == pytest.approx(0.6931472) and losses[0] > losses[1] > losses[2]


def test_a_reward_depends_on_the_last_real_token_not_on_the_padding(tmp_path):
    model, tokenizer = reward_model("lab", tmp_path)
    pair = alignment_task().pairs.heldout[0]
    alone = collate_pairs([encode_pair(tokenizer, pair)], tokenizer.pad_token_id)
    padded = collate_pairs(
        [encode_pair(tokenizer, pair), encode_pair(tokenizer, alignment_task().pairs.heldout[1])],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        first = model.eval()(alone["input_ids"], alone["attention_mask"])
        again = model(padded["input_ids"], padded["attention_mask"])[[0, 2]]
    assert torch.allclose(first, again, atol=1e-5)


def test_sampled_rows_are_scored_as_if_never_padded(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    samples = sample_responses(model, tokenizer, [p.prompt for p in alignment_task().pairs.heldout[:2]], 2, 8)
    rows = right_padded(samples, tokenizer.pad_token_id)
    for row, mask in zip(rows["input_ids"], rows["attention_mask"], strict=True):
        assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # real tokens first, then padding
        assert (row[mask.bool()] != tokenizer.pad_token_id).all()


def test_an_untrained_head_ranks_pairs_near_chance(tmp_path):
    model, tokenizer = reward_model("lab", tmp_path)
    outcomes = pair_outcomes(model.eval(), tokenizer, alignment_task().pairs.heldout)
    assert len(outcomes) == 192 and 0.35 < sum(outcomes) / len(outcomes) < 0.65


def test_the_command_saves_a_reward_model_transformers_loads(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    import fieldguide.alignment.reward_models as module

    task = alignment_task()
    small = type(task)(
        requests=task.requests,
        demonstrations=task.demonstrations,
        pairs=type(task.pairs)(train=task.pairs.train[:8], heldout=task.pairs.heldout[:4]),
    )
    monkeypatch.setattr(module, "alignment_task", lambda: small)
    main(["--max-steps", "2", "--batch-size", "2", "--output", str(tmp_path / "rm")])
    assert "held-out pair accuracy before" in capsys.readouterr().out
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert loaded.config.num_labels == 1
