"""Direct preference optimization (DPO): learn from preference pairs with no reward model and no sampling.

The policy starts as the SFT policy, and a frozen copy of it is the reference. For a pair
(prompt x, chosen y_w, rejected y_l), each response's *implicit reward* is beta times the
log-ratio of its likelihood under the policy and under the reference; the loss is the
Bradley-Terry negative log-likelihood that the chosen response wins on those rewards. Run it::

    fieldguide dpo --beta 0.1 --sft-weight 1

On the lab's tiny model it starts from the SFT policy of ``fieldguide.lab.preferences``; with
``--model`` it starts from that model (an instruct model, say) and aligns it to the same pairs.
"""

import argparse
import copy
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from fieldguide.lab.cache import cached
from fieldguide.lab.chat import encode_instructions, response_prefix
from fieldguide.lab.cli import (
    TINY,
    add_output_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    non_negative_float,
    positive_float,
    training_config,
)
from fieldguide.lab.experiment import Presets, Technique, frozen_copy, real_model_training, run_technique
from fieldguide.lab.loading import parse_and_load, save_if_asked
from fieldguide.lab.metrics import preference_outcomes
from fieldguide.lab.preferences import (
    alignment_task,
    collate_pairs,
    completion_logprobs,
    encode_pair,
    frozen_reference,
    rule_outcomes,
    sampled_kl,
    sft_policy_run,
    token_logprobs,
    well_formed_share,
)
from fieldguide.lab.records import recorded
from fieldguide.lab.tasks import InstructionExample
from fieldguide.lab.training import TrainConfig, causal_lm_loss
from fieldguide.lab.trl_arguments import trl_arguments

BETA = 0.1  # the DPO paper's default for most of its runs, and TRL's
BETAS = (0.01, 0.1, 0.5, 2.0)  # the page's sweep: a 200-fold range around the default

PRESETS = Presets(
    # 200 steps of 16 pairs, about 3.5 passes over the 896 training pairs, at a tenth of the
    # SFT rate: the policy moves away from a model that is already fine-tuned.
    tiny=TrainConfig(max_steps=200, batch_size=16, learning_rate=3e-4, warmup_steps=10),
    # The DPO paper's rate for its real-model runs, 1e-6, with RMSprop; TRL's default is 1e-6 too.
    real=real_model_training(max_steps=200, learning_rate=1e-6),
)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equation (7) of the DPO paper, per pair; with each response's implicit reward.

    Every argument is (B,): log pi(y | x) summed over the response's tokens.
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # r(x, y_w) up to beta log Z(x)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    # log Z(x) is the same for both responses to one prompt, so it cancels in the difference.
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_loss_fn(reference: torch.nn.Module, beta: float, sft_weight: float = 0.0):
    """The harness's loss function: (model, batch of pairs) -> (summed loss, pairs, logs).

    ``sft_weight`` adds that much of the chosen responses' negative log-likelihood, per token
    (TRL's ``loss_type=["sigmoid", "sft"]``): it holds up the likelihood of what is preferred,
    which the DPO loss alone lets fall.
    """

    def loss(model, batch):
        per_token = token_logprobs(model, batch)  # (2B, T - 1)
        policy_chosen, policy_rejected = per_token.sum(dim=-1).chunk(2)  # (B,) each
        with torch.no_grad():  # the reference never trains: no graph, no gradient
            reference_chosen, reference_rejected = completion_logprobs(reference, batch).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta
        )
        margins = chosen_rewards - rejected_rewards
        logs = {"margin": margins.mean(), "accuracy": (margins > 0).float().mean()}
        if sft_weight:
            chosen_tokens = batch["completion_mask"][: len(losses), 1:]
            nll = -per_token[: len(losses)].sum() / chosen_tokens.sum()  # mean over the batch's chosen tokens
            logs["nll"] = nll.detach()
            losses = losses + sft_weight * nll  # the harness averages over pairs: + sft_weight * nll
        return losses.sum(), len(losses), logs

    return loss


@torch.no_grad()
def pair_logprobs(model, tokenizer, pairs, pairs_per_batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_w | x) and log pi(y_l | x) of each pair, (P,) each, a few pairs at a time: all
    192 held-out pairs at once would hold tens of gigabytes of a real model's logits."""
    device, chosen, rejected = next(model.parameters()).device, [], []
    for start in range(0, len(pairs), pairs_per_batch):
        encoded = [encode_pair(tokenizer, p) for p in pairs[start : start + pairs_per_batch]]
        batch = {
            key: value.to(device) for key, value in collate_pairs(encoded, tokenizer.pad_token_id).items()
        }
        for side, logps in zip((chosen, rejected), completion_logprobs(model, batch).chunk(2), strict=True):
            side.append(logps)
    return torch.cat(chosen), torch.cat(rejected)


def implicit_reward_margin(policy, reference, tokenizer, pairs, beta: float) -> float:
    """The mean of r(x, y_w) - r(x, y_l) over ``pairs``: how far the policy has moved toward
    the chosen responses and away from the rejected ones, relative to the reference."""
    policy_chosen, policy_rejected = pair_logprobs(policy, tokenizer, pairs)
    reference_chosen, reference_rejected = pair_logprobs(reference, tokenizer, pairs)
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return float(margins.mean())


def mean_logprobs(model, tokenizer, pairs) -> tuple[float, float]:
    """The mean log-likelihood of the chosen responses of ``pairs``, and of the rejected ones:
    DPO raises their difference, which says nothing of where each one goes."""
    chosen, rejected = pair_logprobs(model, tokenizer, pairs)
    return float(chosen.mean()), float(rejected.mean())


def dpo(reference: torch.nn.Module, beta: float = BETA, sft_weight: float = 0.0) -> Technique:
    """DPO on the lab's training pairs; scored by the rule on the held-out requests' answers."""
    task = alignment_task()
    heldout, prompts = task.pairs.heldout, [request.prompt for request in task.requests.heldout]
    return Technique(
        data=lambda tokenizer: [encode_pair(tokenizer, pair) for pair in task.pairs.train],
        score=lambda model, tokenizer: rule_outcomes(model, tokenizer, task.requests.heldout),
        loss=dpo_loss_fn(reference, beta, sft_weight),
        collate=lambda examples: collate_pairs(examples, reference.config.pad_token_id),
        measures={
            # By likelihood, does the policy rank the good review of a held-out pair first?
            "pair accuracy": lambda model, tokenizer: (
                sum(preference_outcomes(model, tokenizer, heldout)) / len(heldout)
            ),
            "KL to the reference": lambda model, tokenizer: sampled_kl(model, reference, tokenizer, prompts),
            "well-formed answers": lambda model, tokenizer: well_formed_share(
                model, tokenizer, task.requests.heldout
            ),
            "reward margin": lambda model, tokenizer: implicit_reward_margin(
                model, reference, tokenizer, heldout, beta
            ),
            "chosen log-likelihood": lambda model, tokenizer: mean_logprobs(model, tokenizer, heldout)[0],
            "rejected log-likelihood": lambda model, tokenizer: mean_logprobs(model, tokenizer, heldout)[1],
        },
    )


@recorded
@cached  # the page's doctests share one run per beta
def run_dpo(beta: float = BETA, sft_weight: float = 0.0, seed: int = 0):
    """DPO from the SFT policy, which is also the frozen reference."""
    sft = sft_policy_run()
    policy, reference = copy.deepcopy(sft.model), frozen_copy(sft.model)
    technique = dpo(reference, beta, sft_weight)
    return run_technique(technique, policy, sft.tokenizer, replace(PRESETS.tiny, seed=seed))


# -- The same with TRL ---------------------------------------------------------------------


def trl_trainer(
    policy, reference, tokenizer, pairs, config: TrainConfig, output_dir: str, beta=BETA, sft_weight=0.0
):
    """TRL's ``DPOTrainer`` on the same pairs, as chats, with the same beta and NLL weight."""
    import trl  # imported here: TRL is heavy, and only this function needs it
    from datasets import Dataset

    args = trl.DPOConfig(
        **trl_arguments(config, output_dir),
        beta=beta,
        # "sigmoid" is DPO's loss; "sft" the chosen responses' NLL, weighted as ours
        loss_type=["sigmoid", "sft"] if sft_weight else ["sigmoid"],
        loss_weights=[1.0, sft_weight] if sft_weight else None,
    )
    return trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(chat_rows(tokenizer, pairs)),
        processing_class=tokenizer,
    )


def chat_rows(tokenizer, pairs) -> list[dict]:
    """The pairs as TRL's conversational rows, the assistant's turn opened as the lab's own
    encoding opens it (``response_prefix``), so that TRL tokenizes what the lab does."""
    prefix = response_prefix(tokenizer)
    return [
        {
            "prompt": [{"role": "user", "content": pair.prompt}],
            "chosen": [{"role": "assistant", "content": prefix + pair.chosen}],
            "rejected": [{"role": "assistant", "content": prefix + pair.rejected}],
        }
        for pair in pairs
    ]


@recorded
@cached
def run_preferred_ft(seed: int = 0):
    """The DPO paper's Preferred-FT baseline: the SFT policy fine-tuned on the chosen responses
    alone, with the same steps, batch and rate as DPO (a batch of 16 pairs is 16 chosen responses)."""
    sft = sft_policy_run()
    task, reference = alignment_task(), frozen_copy(sft.model)
    chosen = [InstructionExample(pair.prompt, pair.chosen) for pair in task.pairs.train]
    technique = replace(
        dpo(reference),  # the same scores and measures as DPO's runs
        data=lambda tokenizer: encode_instructions(tokenizer, chosen),
        loss=causal_lm_loss,
        collate=None,
    )
    return run_technique(technique, copy.deepcopy(sft.model), sft.tokenizer, replace(PRESETS.tiny, seed=seed))


def finite_beta(text: str) -> float:
    """``--beta``: above 0 and finite (an infinite beta makes every loss NaN)."""
    value = positive_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Align a model to the lab's preference pairs with DPO; print the rule's score.")
    add_training_arguments(parser, PRESETS)
    parser.add_argument(
        "--beta", type=finite_beta, default=BETA, help="how strongly the policy is held to the reference"
    )
    parser.add_argument(
        "--sft-weight",
        type=non_negative_float,
        default=1.0,
        help="weight of the chosen responses' NLL added to the loss (RPO's term; 0 for plain DPO)",
    )
    add_output_argument(parser)
    args, model, tokenizer = parse_and_load(parser, argv)
    if args.model == TINY:  # alignment starts from an instruction-tuned model: the SFT policy
        model = copy.deepcopy(sft_policy_run().model).to(args.device)
    run = run_technique(
        dpo(frozen_reference(model), args.beta, args.sft_weight),
        model,
        tokenizer,
        training_config(args, PRESETS),
        keep_model=True,
    )
    print(run.report("held-out requests answered with a good review"))
    save_if_asked(args.output, run.model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
