"""GRPO: our advantages and loss equal to TRL's GRPOTrainer on the same batch."""

import pytest
import torch

from fieldguide.alignment.grpo import (
    GRPOConfig,
    group_advantages,
    grpo_loss,
    main,
    rule_reward,
    trl_trainer,
)
from fieldguide.lab.loading import load_model
from fieldguide.lab.preferences import ReviewRequest, alignment_task, judge
from fieldguide.lab.training import TrainConfig


def test_group_advantages_are_centred_and_scaled_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    first = advantages[:4]
    assert torch.allclose(first.mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(first.std(), torch.tensor(1.0), atol=1e-3)
    assert torch.equal(advantages[4:], torch.zeros(4))  # a group that all scored alike teaches nothing


def test_the_reward_is_the_rule():
    requests = [ReviewRequest("pie", "stale")] * 3
    answers = ["the pie is not stale", "the pie is stale", "stale pie"]
    assert rule_reward(requests, answers).tolist() == [1.0, 0.0, 0.0]


def test_the_k3_penalty_is_zero_at_the_reference_and_positive_elsewhere():
    logprobs = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    _, kl_same = grpo_loss(logprobs, logprobs, logprobs, torch.zeros(1), mask, beta=0.1, epsilon=0.2)
    _, kl_moved = grpo_loss(logprobs, logprobs, logprobs - 0.5, torch.zeros(1), mask, beta=0.1, epsilon=0.2)
    assert kl_same.item() == 0.0 and kl_moved.item() > 0


CASES = [(0.04, 2, 0), (0.0, 2, 1), (0.1, 3, 2)]  # beta, prompts, seed


@pytest.mark.parametrize(("beta", "num_prompts", "seed"), CASES)
def test_our_advantages_and_loss_equal_trls_on_the_same_batch(beta, num_prompts, seed, tmp_path):
    policy, tokenizer = load_model("tiny")
    requests = alignment_task().requests.train[:num_prompts]
    by_prompt = {r.prompt: r for r in requests}
    seen = []

    def rule(prompts, completions, **kwargs):  # TRL's reward-function signature
        rewards = [
            float(judge(by_prompt[p[0]["content"]], c[0]["content"]))
            for p, c in zip(prompts, completions, strict=True)
        ]
        # Give each group some spread, so that the scaling by the standard deviation counts.
        rewards = [r + 0.25 * (i % 3) for i, r in enumerate(rewards)]
        seen.extend(rewards)
        return rewards

    config = TrainConfig(max_steps=1, batch_size=num_prompts, seed=seed)
    trainer = trl_trainer(policy, tokenizer, requests, rule, config, str(tmp_path / "out"), beta=beta)
    torch.manual_seed(seed)
    with torch.no_grad():  # move the policy off the reference TRL loaded, so the KL counts
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = [
        {"prompt": [{"role": "user", "content": r.prompt}]}
        for r in requests
        for _ in range(GRPOConfig.num_generations)
    ]
    batch = trainer._generate_and_score_completions(inputs)
    ours = group_advantages(torch.tensor(seen), GRPOConfig.num_generations)
    assert torch.allclose(ours, batch["advantages"], atol=1e-6)

    theirs = trainer.compute_loss(trainer.model, batch)
    # The same inputs to both losses: the policy's and the reference's per-token log-probabilities
    # as TRL computes them (its fused LM head), so that what is compared is the loss itself.
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logprobs, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, input_ids, attention_mask, batch["completion_ids"].size(1)
    )
    mask = batch["completion_mask"].float()
    reference = batch.get("ref_per_token_logps", torch.zeros_like(logprobs))
    value, _ = grpo_loss(logprobs, logprobs.detach(), reference, ours, mask, beta, GRPOConfig.epsilon)
    assert abs(value.item() - theirs.item()) <= 1e-6 * max(1.0, abs(theirs.item()))


def test_a_negative_beta_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--beta", "-1"])
    assert exit_info.value.code == 2 and "argument --beta" in capsys.readouterr().err
