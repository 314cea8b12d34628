"""DPO: our loss equal to TRL's DPOTrainer on the same batch, its gradient too, and its command line."""

import copy

import pytest
import torch

from fieldguide.alignment import dpo as dpo_module
from fieldguide.alignment.dpo import dpo_loss, dpo_loss_fn, implicit_reward_margin, main, trl_trainer
from fieldguide.lab.experiment import frozen_copy
from fieldguide.lab.loading import load_model
from fieldguide.lab.preferences import alignment_task, collate_pairs, encode_pair
from fieldguide.lab.training import TrainConfig
from lab_factories import small_alignment_task
from model_families import save_family_model

CONFIG = TrainConfig(max_steps=1, batch_size=4)


def policy_and_reference(family, tmp_path):
    """A policy nudged away from its reference, so that the log-ratios are not zero."""
    model, tokenizer = load_model("tiny" if family == "lab" else save_family_model(family, tmp_path / family))
    reference = frozen_copy(model)
    policy = copy.deepcopy(model).train().requires_grad_(True)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return policy, reference, tokenizer


CASES = [  # family, pairs, beta, sft_weight
    ("lab", 1, 0.1, 0.0),
    ("lab", 4, 0.1, 1.0),
    ("lab", 3, 0.01, 0.0),
    ("lab", 2, 2.0, 0.5),
    ("qwen2", 3, 0.1, 0.0),
    ("qwen2", 4, 0.5, 1.0),
]


@pytest.mark.parametrize(("family", "num_pairs", "beta", "sft_weight"), CASES)
def test_our_loss_and_gradient_equal_trls_on_the_same_batch(family, num_pairs, beta, sft_weight, tmp_path):
    policy, reference, tokenizer = policy_and_reference(family, tmp_path)
    pairs = alignment_task().pairs.train[:num_pairs]
    config = TrainConfig(max_steps=1, batch_size=num_pairs)
    trainer = trl_trainer(
        policy, reference, tokenizer, pairs, config, str(tmp_path / "out"), beta, sft_weight
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(num_pairs)])
    theirs = trainer.compute_loss(policy, batch)
    (theirs_grad,) = torch.autograd.grad(theirs, [policy.lm_head.weight])
    total, count, _ = dpo_loss_fn(reference, beta, sft_weight)(policy, batch)
    ours = total / count
    (ours_grad,) = torch.autograd.grad(ours, [policy.lm_head.weight])
    # Within 1e-6, relative to the loss where it is above 1: float32 resolves a loss of 4.6
    # to about 5e-7, and two correct sums in another order differ by a few of those steps.
    assert abs(ours.item() - theirs.item()) <= 1e-6 * max(1.0, abs(theirs.item()))
    assert (ours_grad - theirs_grad).abs().max() <= 1e-5 * theirs_grad.abs().max(), (
        (ours_grad - theirs_grad).abs().max(),
        theirs_grad.abs().max(),
    )


def test_our_batches_equal_trls_for_the_labs_chat_template(tmp_path):
    policy, reference, tokenizer = policy_and_reference("lab", tmp_path)
    pairs = alignment_task().pairs.heldout[:5]
    trainer = trl_trainer(policy, reference, tokenizer, pairs, CONFIG, str(tmp_path / "out"))
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    ours = collate_pairs([encode_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)
    assert set(ours) <= set(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def test_the_loss_starts_at_log_two_with_zero_rewards():
    logps = torch.tensor([-3.0, -5.0])
    losses, chosen, rejected = dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.1)
    assert torch.allclose(losses, torch.full((2,), torch.log(torch.tensor(2.0)).item()))
    assert chosen.abs().sum() == rejected.abs().sum() == 0


def test_the_loss_falls_as_the_chosen_response_gains_on_the_rejected_one():
    reference = torch.zeros(3)
    gains = torch.tensor([-1.0, 0.0, 1.0])
    losses, chosen, rejected = dpo_loss(gains, -gains, reference, reference, beta=0.5)
    assert losses[0] > losses[1] > losses[2]
    assert torch.allclose(chosen - rejected, gains)  # beta * (gain - (-gain)) = gain at beta 0.5


def test_the_margin_is_zero_before_the_policy_moves(tiny):
    model, tokenizer = tiny
    pairs = alignment_task().pairs.heldout[:4]
    assert implicit_reward_margin(model, frozen_copy(model), tokenizer, pairs, beta=0.1) == 0.0


@pytest.mark.parametrize("beta", ["0", "-0.1", "nan", "inf", "big"])
def test_a_bad_beta_is_refused_in_one_line(beta, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--beta", beta])
    assert exit_info.value.code == 2
    assert "argument --beta" in capsys.readouterr().err


def test_the_command_aligns_the_tiny_model_and_prints_its_report(capsys, monkeypatch):
    monkeypatch.setattr(dpo_module, "alignment_task", small_alignment_task)
    main(["--max-steps", "2", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "held-out requests answered with a good review before" in out and "reward margin" in out
