"""PPO's pieces against their definitions: per-token rewards, GAE, whitening, the clipped loss."""

import pytest
import torch

from fieldguide.alignment.ppo import (
    PPOConfig,
    generalized_advantages,
    main,
    per_token_rewards,
    ppo_loss_fn,
    whiten,
)


def gae_by_definition(rewards, values, mask, gamma, lam):
    """A_t = sum over later answer tokens t' of (gamma lam)^(t' - t) TD_{t'}, written out."""
    advantages = torch.zeros_like(rewards)
    for row in range(len(rewards)):
        steps = mask[row].nonzero().flatten().tolist()
        for i, t in enumerate(steps):
            total = 0.0
            for k, u in enumerate(steps[i:]):
                next_value = values[row, steps[i + k + 1]] if i + k + 1 < len(steps) else 0.0
                delta = rewards[row, u] + gamma * next_value - values[row, u]
                total += (gamma * lam) ** k * delta
            advantages[row, t] = total
    return advantages


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (1.0, 1.0), (1.0, 0.0), (0.9, 0.5)])
def test_gae_equals_its_definition(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]).float()
    advantages, returns = generalized_advantages(rewards * mask, values * mask, mask, gamma, lam)
    expected = gae_by_definition(rewards * mask, values * mask, mask, gamma, lam)
    assert torch.allclose(advantages, expected, atol=1e-5)
    assert torch.allclose(returns * mask, (advantages + values * mask) * mask)


def test_with_lambda_one_the_advantage_is_the_return_to_go_minus_the_value():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    mask = torch.ones(1, 4)
    advantages, _ = generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[6.0, 6.0, 5.0, 3.0]]) - 0.5)


def test_the_score_lands_on_the_last_answer_token_and_the_penalty_on_every_one():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -1.0, 0.0]])
    reference = torch.tensor([[0.0, -1.5, -1.0, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = per_token_rewards(torch.tensor([4.0]), logprobs, reference, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[0.0, -0.05, 0.1, 4.0, 0.0]]))


def test_whitened_advantages_have_mean_zero_and_unit_variance_on_the_mask():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(values, mask)
    kept = out[mask.bool()]
    assert kept.mean().abs() < 1e-6 and (kept.pow(2).mean() - 1).abs() < 1e-4 and out[0, 3] == 0


class Constant(torch.nn.Module):
    """A policy and value model whose outputs are given: to check the loss by hand."""

    def __init__(self, logprobs, values):
        super().__init__()
        self.logprobs, self.values = torch.nn.Parameter(logprobs), torch.nn.Parameter(values)


def test_the_clipped_surrogate_takes_the_worse_of_moved_and_clipped(monkeypatch):
    import fieldguide.alignment.ppo as module

    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5 and 1.1
    advantages = torch.tensor([[1.0, -1.0, 1.0]])
    model = type("M", (), {})()
    model.policy, model.value = Constant(new, torch.zeros(1, 3)), None
    monkeypatch.setattr(module, "token_logprobs", lambda policy, batch: policy.logprobs)
    model.value = lambda batch: torch.zeros(1, 3)
    batch = {
        "completion_mask": torch.ones(1, 4),
        "old_logprobs": old,
        "advantages": advantages,
        "old_values": torch.zeros(1, 3),
        "returns": torch.zeros(1, 3),
        "scores": torch.zeros(1),
        "kl": torch.zeros(1),
    }
    total, count, logs = ppo_loss_fn(PPOConfig(clip_range=0.2, value_coef=0.0))(model, batch)
    # Token 1: ratio 1.5 with a positive advantage, clipped to 1.2. Token 2: ratio 0.5 with a
    # negative advantage, clipped to 0.8 (the clipped objective, -0.8 * -1, is the worse one
    # to minimise: 0.8 > 0.5). Token 3: inside the range, unclipped.
    expected = -(1.2 * 1.0 + 0.8 * -1.0 + 1.1 * 1.0) / 3
    assert total.item() / count == pytest.approx(expected, abs=1e-6)
    assert logs["clipped"].item() == pytest.approx(2 / 3)


def test_a_real_model_is_refused_before_anything_loads(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "tiny model only" in capsys.readouterr().err
