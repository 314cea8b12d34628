"""GRPO: PPO without a value model, for rewards a program can check.

For each prompt, sample a group of answers from the policy and reward each one; an answer's
advantage is its reward minus the group's mean, divided by the group's standard deviation.
Every token of an answer shares its advantage, and the loss is PPO's clipped surrogate with
a KL penalty to the reference added per token. The reward here is verifiable: the lab's rule,
1 for an answer that is a good review as asked and 0 otherwise, computed by a program rather
than learned. Run it::

    fieldguide grpo --max-steps 100

It starts from the lab's SFT policy, which writes a good review for about half the requests.
"""

import copy
from dataclasses import dataclass, replace

import torch

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    TINY,
    add_output_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    non_negative_float,
)
from fieldguide.lab.cli import training_config as config_from_args
from fieldguide.lab.experiment import Presets, Technique, frozen_copy, real_model_training, run_technique
from fieldguide.lab.loading import parse_and_load, save_if_asked
from fieldguide.lab.preferences import (
    MAX_NEW_TOKENS,
    ReviewRequest,
    alignment_task,
    frozen_reference,
    judge,
    rule_outcomes,
    sample_responses,
    sft_policy_run,
    token_logprobs,
)
from fieldguide.lab.records import recorded
from fieldguide.lab.training import TrainConfig
from fieldguide.lab.trl_arguments import trl_arguments


@dataclass(frozen=True)
class GRPOConfig:
    num_generations: int = 8  # G: answers sampled per prompt, one group
    beta: float = 0.04  # the weight of the per-token KL penalty (k3) to the reference
    epsilon: float = 0.2  # the clip range of the probability ratio
    evaluate_every: int = 25  # steps between the held-out scores logged while training


PRESETS = Presets(
    # 300 steps, each 8 prompts with 8 answers sampled for each.
    tiny=TrainConfig(max_steps=300, batch_size=8, learning_rate=1e-4, warmup_steps=10),
    real=real_model_training(max_steps=300, learning_rate=1e-6, grad_accum_steps=1, batch_size=8),
)


def rule_reward(requests: list[ReviewRequest], answers: list[str]) -> torch.Tensor:
    """The verifiable reward: the rule's verdict on each answer, 1 or 0. (N,)"""
    return torch.tensor(
        [float(judge(request, answer)) for request, answer in zip(requests, answers, strict=True)]
    )


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Each reward minus its group's mean, over the group's standard deviation (unbiased, as
    TRL's ``scale_rewards="group"``); rows come in groups of ``group_size``. (N,)"""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:  # a group whose answers all scored alike has std 0 and advantages 0: it teaches nothing
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.flatten()


def grpo_loss(logprobs, old_logprobs, reference_logprobs, advantages, mask, beta: float, epsilon: float):
    """Equation eq-grpo-loss: the clipped surrogate and the k3 KL penalty, per token; averaged
    over each answer's tokens, then over the answers (TRL's ``loss_type="grpo"``)."""
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.min(
        ratio * advantages[:, None], ratio.clamp(1 - epsilon, 1 + epsilon) * advantages[:, None]
    )
    log_ratio = reference_logprobs - logprobs
    kl = torch.exp(log_ratio) - log_ratio - 1  # k3: never negative, unbiased over the policy's samples
    per_token = -(surrogate - beta * kl)
    per_answer = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_answer.mean(), (kl * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def grpo_loss_fn(reference, tokenizer, heldout: list[ReviewRequest], config: GRPOConfig):
    """The harness's loss function: a batch of requests in, a sampled group for each, one step."""
    steps = {"taken": 0, "heldout": None}

    def loss(model, batch):
        requests = [r for r in batch["requests"] for _ in range(config.num_generations)]
        if steps["taken"] % config.evaluate_every == 0:  # the held-out score, now and then
            steps["heldout"] = sum(rule_outcomes(model, tokenizer, heldout)) / len(heldout)
        steps["taken"] += 1
        samples = sample_responses(
            model, tokenizer, [r.prompt for r in batch["requests"]], config.num_generations
        )
        tensors = {key: value for key, value in samples.items() if key != "responses"}
        rewards = rule_reward(requests, samples["responses"])
        advantages = group_advantages(rewards, config.num_generations).to(tensors["input_ids"].device)
        mask = tensors["completion_mask"][:, 1:].float()
        logprobs = token_logprobs(model, tensors)
        with torch.no_grad():
            reference_logprobs = token_logprobs(reference, tensors)
        # One step per rollout: the sampling policy is the current one, so the ratio is 1 and
        # only its gradient counts (TRL does the same with num_iterations=1).
        value, kl = grpo_loss(
            logprobs, logprobs.detach(), reference_logprobs, advantages, mask, config.beta, config.epsilon
        )
        logs = {"reward": rewards.mean(), "kl": kl.mean().detach(), "held-out score": steps["heldout"]}
        return value * len(requests), len(requests), logs

    return loss


def grpo(reference, tokenizer, config: GRPOConfig = GRPOConfig()) -> Technique:
    """GRPO on the training requests; scored by the rule on the held-out requests' answers."""
    requests = alignment_task().requests
    return Technique(
        data=lambda tokenizer: requests.train,
        score=lambda model, tokenizer: rule_outcomes(model, tokenizer, requests.heldout),
        loss=grpo_loss_fn(reference, tokenizer, requests.heldout, config),
        collate=lambda examples: {"requests": examples},
    )


@recorded
@cached  # the page's doctests share one run
def run_grpo(beta: float = GRPOConfig.beta, seed: int = 0):
    """GRPO from the SFT policy, which is also the frozen reference."""
    start = sft_policy_run()
    reference = frozen_copy(start.model)
    technique = grpo(reference, start.tokenizer, GRPOConfig(beta=beta))
    return run_technique(
        technique, copy.deepcopy(start.model), start.tokenizer, replace(PRESETS.tiny, seed=seed)
    )


# -- The same with TRL ---------------------------------------------------------------------


def trl_trainer(
    policy, tokenizer, requests, reward_function, config: TrainConfig, output_dir: str, beta=0.04
):
    """TRL's ``GRPOTrainer`` on the same prompts, with ``reward_function`` and the same settings
    (``loss_type="grpo"``: TRL's default is now DAPO's token-level average)."""
    import trl  # imported here: TRL is heavy, and only this function needs it
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": r.prompt}]} for r in requests]
    # TRL's batch counts answers, ours prompts: a batch of B prompts is B groups of answers.
    grouped = replace(config, batch_size=config.batch_size * GRPOConfig.num_generations)
    args = trl.GRPOConfig(
        **trl_arguments(grouped, output_dir),
        num_generations=GRPOConfig.num_generations,
        max_completion_length=MAX_NEW_TOKENS,
        beta=beta,
        epsilon=GRPOConfig.epsilon,
        loss_type="grpo",
    )
    return trl.GRPOTrainer(
        model=policy,
        reward_funcs=[reward_function],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Train with GRPO, the lab's rule as the reward; print the rule's score on held-out requests."
    )
    add_training_arguments(parser, PRESETS)
    parser.add_argument(
        "--beta",
        type=non_negative_float,
        default=GRPOConfig.beta,
        help="weight of the KL penalty to the reference",
    )
    add_output_argument(parser)
    args, model, tokenizer = parse_and_load(parser, argv)
    if args.model == TINY:  # alignment starts from an instruction-tuned model: the SFT policy
        model = copy.deepcopy(sft_policy_run().model).to(args.device)
    technique = grpo(frozen_reference(model), tokenizer, GRPOConfig(beta=args.beta))
    run = run_technique(technique, model, tokenizer, config_from_args(args, PRESETS), keep_model=True)
    print(run.report("held-out requests answered with a good review"))
    save_if_asked(args.output, run.model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
