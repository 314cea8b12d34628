"""RLHF with PPO: a policy that samples answers, a reward model that scores them, and a KL leash.

Each PPO iteration is a rollout and an update. The rollout samples answers to a batch of
prompts from the policy and keeps, for every answer token, the policy's and the reference's
log-probabilities and the value model's estimate; the reward model scores each whole answer,
and the per-token reward is that score at the last token minus the KL penalty at every token.
Generalized advantage estimation turns rewards and values into advantages. The update then
takes several epochs of minibatches over the rollout, with PPO's clipped surrogate for the
policy and a clipped squared error for the value model. Run it::

    fieldguide ppo --kl-coef 0.05

On the lab's tiny model the policy starts from the SFT policy, and the reward model and the
value model from the reward model page's.
"""

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from fieldguide.alignment.reward_models import RewardModel, right_padded, trained_reward_model
from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    TINY,
    add_training_arguments,
    example_parser,
    main_guard,
    non_negative_float,
    require_device,
)
from fieldguide.lab.cli import training_config as config_from_args
from fieldguide.lab.experiment import Presets, Technique, frozen_copy, real_model_training, run_technique
from fieldguide.lab.preferences import (
    alignment_task,
    rule_outcomes,
    sample_responses,
    sampled_kl,
    sft_policy_run,
    token_logprobs,
    well_formed_share,
)
from fieldguide.lab.records import recorded
from fieldguide.lab.training import TrainConfig


@dataclass(frozen=True)
class PPOConfig:
    kl_coef: float = 0.2  # beta: the weight of the per-token KL penalty in the reward
    prompts_per_rollout: int = 16  # requests sampled from in one rollout
    samples_per_prompt: int = 4  # answers sampled for each
    ppo_epochs: int = 4  # passes over one rollout's experience (TRL's num_ppo_epochs)
    minibatches: int = 4  # each epoch's share of the rollout, one optimizer step each
    clip_range: float = 0.2  # epsilon: how far the probability ratio may move before clipping
    clip_range_value: float = 0.2  # the same for the value model's estimates
    value_coef: float = 0.1  # the weight of the value loss (TRL's vf_coef)
    gamma: float = 1.0  # discount: an answer is one episode, every token counts alike
    lam: float = 0.95  # GAE's lambda: from one-step TD (0) to Monte Carlo returns (1)


PRESETS = Presets(
    # 120 rollouts of 64 answers, each 4 epochs of 4 minibatches of 16 answers: 1,920 steps.
    tiny=TrainConfig(max_steps=1920, batch_size=16, learning_rate=3e-4),
    real=real_model_training(max_steps=1920, learning_rate=1e-6, grad_accum_steps=1, batch_size=16),
)


class ValueModel(nn.Module):
    """A decoder with a one-output head read at every position: V(state) for each token."""

    def __init__(self, reward_model: RewardModel):
        super().__init__()
        # InstructGPT starts the value model from the reward model: it already reads answers.
        self.model = copy.deepcopy(reward_model.model)
        self.score = copy.deepcopy(reward_model.score)

    def forward(self, batch: dict) -> torch.Tensor:
        """The value before each next token of every row: (N, T - 1)."""
        hidden = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).last_hidden_state
        return self.score(hidden[:, :-1]).squeeze(-1).float()  # (N, T - 1): the value before token t + 1


class PolicyAndValue(nn.Module):
    """What trains: the policy and the value model, one optimizer over both."""

    def __init__(self, policy: nn.Module, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value


# -- The rollout -------------------------------------------------------------------------------


def per_token_rewards(
    scores: torch.Tensor, logprobs, reference_logprobs, mask, kl_coef: float
) -> torch.Tensor:
    """The reward of each answer token: minus the KL penalty, and the reward model's score at the
    last one. The penalty uses the estimator log pi - log pi_ref (k1) at each sampled token. (N, T - 1)"""
    rewards = -kl_coef * (logprobs - reference_logprobs) * mask
    last = mask.size(1) - 1 - mask.flip(dims=[1]).long().argmax(dim=1)  # the last answer token of each row
    rewards[torch.arange(len(rewards)), last] += scores
    return rewards


def generalized_advantages(
    rewards, values, mask, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE: A_t = delta_t + gamma lam A_{t+1}, delta_t = r_t + gamma V_{t+1} - V_t, over the
    answer tokens (masked positions contribute nothing); returns A_t + V_t as the value targets."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(len(rewards))
    next_value = torch.zeros(len(rewards))
    for t in reversed(range(rewards.size(1))):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(live.bool(), delta + gamma * lam * running, running)
        advantages[:, t] = running * live
        next_value = torch.where(live.bool(), values[:, t], next_value)
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Shift and scale to mean 0 and variance 1 over the masked entries, as PPO implementations
    normalise advantages."""
    mean = (values * mask).sum() / mask.sum()
    variance = (((values - mean) * mask) ** 2).sum() / mask.sum()
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


@torch.no_grad()
def rollout(
    model: PolicyAndValue, reference, reward_model, tokenizer, prompts: list[str], config: PPOConfig
) -> dict:
    """Sample answers, score them, and store what the update needs, per answer token."""
    samples = sample_responses(model.policy, tokenizer, prompts, config.samples_per_prompt)
    batch = {key: value for key, value in samples.items() if key != "responses"}
    mask = batch["completion_mask"][:, 1:].float()  # (N, T - 1): position t scores token t + 1
    logprobs = token_logprobs(model.policy, batch)
    reference_logprobs = token_logprobs(reference, batch)
    scores = reward_model(**right_padded(samples, tokenizer.pad_token_id))  # (N,)
    values = model.value(batch) * mask
    rewards = per_token_rewards(scores, logprobs, reference_logprobs, mask, config.kl_coef)
    advantages, returns = generalized_advantages(rewards, values, mask, config.gamma, config.lam)
    return {
        **batch,
        "old_logprobs": logprobs,
        "old_values": values,
        "advantages": whiten(advantages, mask),
        "returns": returns,
        "scores": scores,
        "kl": ((logprobs - reference_logprobs) * mask).sum(dim=1),
    }


# -- The update --------------------------------------------------------------------------------


def ppo_loss_fn(config: PPOConfig):
    """The harness's loss function over a minibatch of stored experience."""

    def loss(model: PolicyAndValue, batch: dict):
        mask = batch["completion_mask"][:, 1:].float()
        logprobs = token_logprobs(model.policy, batch)
        ratio = torch.exp(logprobs - batch["old_logprobs"])
        # The clipped surrogate: the worse of the moved and the clipped objective, per token.
        unclipped = -batch["advantages"] * ratio
        clipped = -batch["advantages"] * ratio.clamp(1 - config.clip_range, 1 + config.clip_range)
        policy_loss = (torch.max(unclipped, clipped) * mask).sum() / mask.sum()
        values = model.value(batch)
        values_clipped = batch["old_values"] + (values - batch["old_values"]).clamp(
            -config.clip_range_value, config.clip_range_value
        )
        value_error = torch.max((values - batch["returns"]) ** 2, (values_clipped - batch["returns"]) ** 2)
        value_loss = 0.5 * (value_error * mask).sum() / mask.sum()
        logs = {
            "reward": batch["scores"].mean(),
            "kl": batch["kl"].mean(),
            "clipped": ((unclipped < clipped).float() * mask).sum() / mask.sum(),
        }
        total = policy_loss + config.value_coef * value_loss
        return total * len(mask), len(mask), logs  # the harness divides by the rows again

    return loss


def rollouts(reference, reward_model, tokenizer, config: PPOConfig):
    """The harness's sampler: a rollout, then its experience as minibatches, epoch after epoch."""

    def sampler(model, dataset, train_config, start):
        generator = torch.Generator().manual_seed(train_config.seed)
        while True:
            picks = torch.randperm(len(dataset), generator=generator)[: config.prompts_per_rollout]
            experience = rollout(
                model, reference, reward_model, tokenizer, [dataset[i] for i in picks], config
            )
            rows = len(experience["input_ids"])
            size = rows // config.minibatches
            for _ in range(config.ppo_epochs):
                order = torch.randperm(rows, generator=generator)
                for first in range(0, rows, size):
                    yield [
                        {key: value[i] for key, value in experience.items()}
                        for i in order[first : first + size]
                    ]

    return sampler


def stack(examples: list[dict]) -> dict:
    return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}


def ppo(reference, reward_model, tokenizer, config: PPOConfig = PPOConfig()) -> Technique:
    """PPO on the training requests; scored by the rule on the held-out requests' answers."""
    task = alignment_task()
    heldout = task.requests.heldout
    prompts = [r.prompt for r in heldout]
    return Technique(
        # Both train: the policy, and the value model (a copy of the frozen reward model).
        prepare=lambda model, tokenizer: (
            PolicyAndValue(model, ValueModel(reward_model)).requires_grad_(True).train()
        ),
        data=lambda tokenizer: [r.prompt for r in task.requests.train],
        score=lambda model, tokenizer: rule_outcomes(model.policy, tokenizer, heldout),
        loss=ppo_loss_fn(config),
        sampler=rollouts(reference, reward_model, tokenizer, config),
        collate=stack,
        measures={
            "learned reward": lambda model, tokenizer: learned_reward(
                model.policy, reward_model, tokenizer, prompts
            ),
            "KL to the reference": lambda model, tokenizer: sampled_kl(
                model.policy, reference, tokenizer, prompts
            ),
            "well-formed answers": lambda model, tokenizer: well_formed_share(
                model.policy, tokenizer, heldout
            ),
        },
    )


@torch.no_grad()
def learned_reward(policy, reward_model, tokenizer, prompts: list[str], num_samples: int = 8) -> float:
    """The reward model's mean score of the policy's sampled answers to ``prompts``."""
    samples = sample_responses(policy, tokenizer, prompts, num_samples)
    return float(reward_model(**right_padded(samples, tokenizer.pad_token_id)).mean())


@recorded
@cached  # the page's doctests share one run per setting
def run_ppo(kl_coef: float = PPOConfig.kl_coef, max_steps: int = PRESETS.tiny.max_steps, seed: int = 0):
    """PPO from the SFT policy, against the reward model page's reward model."""
    sft, reward_model = sft_policy_run(), trained_reward_model()
    reference, config = frozen_copy(sft.model), PPOConfig(kl_coef=kl_coef)
    technique = ppo(reference, reward_model, sft.tokenizer, config)
    train = replace(PRESETS.tiny, max_steps=max_steps, seed=seed)
    return run_technique(technique, copy.deepcopy(sft.model), sft.tokenizer, train)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Align the tiny model with PPO against the reward model page's; print the rule's score.",
        model_help="only the lab's tiny model: the reward model is the one trained on its SFT policy",
    )
    add_training_arguments(parser, PRESETS)
    parser.add_argument(
        "--kl-coef",
        type=non_negative_float,
        default=PPOConfig.kl_coef,
        help="weight of the per-token KL penalty",
    )
    args = parser.parse_args(argv)
    if args.model != TINY:  # refused before anything loads
        parser.error(
            "argument --model: PPO here trains against the lab's reward model, for the tiny model only"
        )
    require_device(parser, args.device)
    sft, reward_model = sft_policy_run(), trained_reward_model().to(args.device)
    policy, reference = copy.deepcopy(sft.model).to(args.device), frozen_copy(sft.model).to(args.device)
    config = PPOConfig(kl_coef=args.kl_coef)
    technique = ppo(reference, reward_model, sft.tokenizer, config)
    run = run_technique(technique, policy, sft.tokenizer, config_from_args(args, PRESETS))
    print(run.report("held-out requests answered with a good review"))


if __name__ == "__main__":
    main_guard(main)
