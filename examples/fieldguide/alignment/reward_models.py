"""Reward models: a number for a response, learned from which of two responses was preferred.

A reward model is a language model whose LM head is replaced by a linear layer with one
output, read at the last token of prompt and response: one number for the whole response. It
is trained on preference pairs with the Bradley-Terry loss, so that the chosen response of a
pair scores higher than the rejected one. Run it::

    fieldguide reward-models

On the lab's tiny model it starts from the SFT policy's weights, as InstructGPT's reward
models started from its SFT models; with ``--model`` it starts from that model.
"""

import copy
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification

from fieldguide.lab.cache import cached
from fieldguide.lab.chat import response_prefix
from fieldguide.lab.cli import TINY, add_output_argument, add_training_arguments, example_parser, main_guard
from fieldguide.lab.cli import training_config as config_from_args
from fieldguide.lab.experiment import Presets, Technique, real_model_training, run_technique
from fieldguide.lab.loading import parse_and_load
from fieldguide.lab.preferences import (
    alignment_task,
    collate_pairs,
    encode_pair,
    read_review,
    sample_responses,
    sft_policy_run,
)
from fieldguide.lab.records import recorded
from fieldguide.lab.training import TrainConfig, seed_everything
from fieldguide.lab.trl_arguments import trl_arguments

PRESETS = Presets(
    # 200 steps of 16 pairs, about 3.5 passes over the 896 training pairs.
    tiny=TrainConfig(max_steps=200, batch_size=16, learning_rate=3e-4, warmup_steps=10),
    # TRL's RewardConfig default rate, 1e-4, is for LoRA-sized updates; a whole model of real size
    # takes the lab's fine-tuning rate.
    real=real_model_training(max_steps=200),
)


class RewardModel(nn.Module):
    """A causal LM's decoder with a one-output head, read at each row's last real token.

    The names are transformers' ``*ForSequenceClassification`` ones (``model``, ``score``), so
    the weights load into ``AutoModelForSequenceClassification`` unchanged; built from such a
    classifier, it keeps the classifier's head.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.config = backbone.config
        self.model = backbone.model  # the decoder: embeddings and blocks, without the LM head
        if isinstance(getattr(backbone, "score", None), nn.Linear):  # a trained reward model
            self.score = backbone.score
        else:
            self.score = nn.Linear(self.config.hidden_size, 1, bias=False)
            # Small random weights: rewards start near 0 and uncorrelated with anything.
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(self.config.hidden_size))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One reward per row of right-padded ``input_ids``: (N,)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, d)
        last = attention_mask.sum(dim=1) - 1  # right padding: the last real token closes the turn
        return self.score(hidden[torch.arange(len(hidden)), last]).squeeze(-1).float()  # (N,)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood that each chosen response wins, per pair (equation eq-bt-loss)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def reward_loss(model: RewardModel, batch: dict):
    """The harness's loss function: a batch of pairs, chosen rows then rejected rows."""
    chosen, rejected = model(batch["input_ids"], batch["attention_mask"]).chunk(2)  # (B,) each
    losses = bradley_terry_loss(chosen, rejected)
    return losses.sum(), len(losses), {"accuracy": (chosen > rejected).float().mean()}


@torch.no_grad()
def pair_outcomes(model: RewardModel, tokenizer, pairs) -> list[int]:
    """1 for each pair whose chosen response gets the higher reward."""
    device = next(model.parameters()).device
    outcomes = []
    for start in range(0, len(pairs), 64):
        encoded = [encode_pair(tokenizer, pair) for pair in pairs[start : start + 64]]
        batch = collate_pairs(encoded, tokenizer.pad_token_id)
        chosen, rejected = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).chunk(2)
        outcomes += (chosen > rejected).int().tolist()
    return outcomes


@torch.no_grad()
def rewards_by_verdict(model: RewardModel, samples: dict, labels: list) -> dict[str, float]:
    """The mean reward of sampled answers, grouped by what the rule says they are."""
    device = next(model.parameters()).device
    rewards = model(samples["input_ids"].to(device), samples["attention_mask"].to(device)).tolist()
    groups = {"good": 1, "bad": 0, "ill-formed": None}
    return {
        name: sum(r for r, label in zip(rewards, labels, strict=True) if label == value)
        / max(1, labels.count(value))
        for name, value in groups.items()
    }


def answers_to_judge(policy, tokenizer, num_samples: int = 8) -> tuple[dict, list]:
    """The SFT policy's sampled answers to the held-out requests, and the rule's reading of each:
    the kind of answers a policy being trained against the reward model will write."""
    requests = alignment_task().requests.heldout
    seed_everything(0)
    samples = sample_responses(policy, tokenizer, [r.prompt for r in requests], num_samples)
    # Rows are grouped by request, num_samples each; the reward model reads them right-padded.
    labels = [read_review(requests[i // num_samples], text) for i, text in enumerate(samples["responses"])]
    return right_padded(samples, tokenizer.pad_token_id), labels


def right_padded(samples: dict, pad_token_id: int) -> dict:
    """Sampled rows (left-padded prompts, then answers) as right-padded rows of their real tokens."""
    rows = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(samples["input_ids"], samples["attention_mask"], strict=True)
    ]
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }


def reward_modelling(pad_token_id: int, samples: dict | None = None, labels: list | None = None) -> Technique:
    """Train a reward model on the lab's training pairs; score it by held-out pair accuracy."""
    task = alignment_task()
    measures = {}
    if samples is not None:  # the reward of the policy's own answers, by the rule's verdict
        for name in ("good", "bad", "ill-formed"):
            measures[f"reward of {name} answers"] = lambda model, tokenizer, name=name: rewards_by_verdict(
                model, samples, labels
            )[name]
    return Technique(
        prepare=lambda model, tokenizer: RewardModel(model).requires_grad_(True),
        data=lambda tokenizer: [encode_pair(tokenizer, pair) for pair in task.pairs.train],
        score=lambda model, tokenizer: pair_outcomes(model, tokenizer, task.pairs.heldout),
        loss=reward_loss,
        collate=lambda examples: collate_pairs(examples, pad_token_id),
        measures=measures,
    )


@cached  # the page's run, and the reward model the PPO page trains against
def reward_model_run(seed: int = 0):
    """A reward model from the SFT policy's weights, trained on the lab's pairs; the run keeps
    it as a transformers classifier (``to_transformers``)."""
    sft = sft_policy_run()
    samples, labels = answers_to_judge(sft.model, sft.tokenizer)
    technique = reward_modelling(sft.tokenizer.pad_token_id, samples, labels)
    run = run_technique(
        technique, copy.deepcopy(sft.model), sft.tokenizer, replace(PRESETS.tiny, seed=seed), True
    )
    run.model = to_transformers(run.model)
    return run


@recorded
def run_reward_model(seed: int = 0):
    """The page's run: its numbers, recorded (the model itself stays in the local cache)."""
    return reward_model_run(seed)


def trained_reward_model(seed: int = 0) -> RewardModel:
    """The page's reward model, frozen, for a policy to be trained against."""
    return RewardModel(reward_model_run(seed).model).eval().requires_grad_(False)


def to_transformers(model: RewardModel) -> nn.Module:
    """The same reward model as transformers' ``AutoModelForSequenceClassification``, to save or
    to hand to TRL: the same weights under the same names, on the same device."""
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    weight = model.score.weight
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=weight.dtype).to(weight.device)
    classifier.load_state_dict(model.state_dict())  # strict: every weight has its place, and no other
    return classifier


def trl_trainer(model: nn.Module, tokenizer, pairs, config: TrainConfig, output_dir: str):
    """TRL's ``RewardTrainer`` on the same pairs, as chats; ``model`` is a transformers classifier."""
    import trl  # imported here: TRL is heavy, and only this function needs it
    from datasets import Dataset

    prefix = response_prefix(tokenizer)
    rows = [
        {
            "chosen": [
                {"role": "user", "content": p.prompt},
                {"role": "assistant", "content": prefix + p.chosen},
            ],
            "rejected": [
                {"role": "user", "content": p.prompt},
                {"role": "assistant", "content": prefix + p.rejected},
            ],
        }
        for p in pairs
    ]
    args = trl.RewardConfig(**trl_arguments(config, output_dir))
    return trl.RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Train a reward model on the lab's preference pairs; print held-out pair accuracy."
    )
    add_training_arguments(parser, PRESETS)
    add_output_argument(parser, "the reward model, as an AutoModelForSequenceClassification")
    args, model, tokenizer = parse_and_load(parser, argv)
    if args.model == TINY:  # a reward model starts from the instruction-tuned model: the SFT policy
        model = copy.deepcopy(sft_policy_run().model).to(args.device)
    run = run_technique(
        reward_modelling(tokenizer.pad_token_id),
        model,
        tokenizer,
        config_from_args(args, PRESETS),
        keep_model=True,
    )
    print(run.report("held-out pair accuracy"))
    if args.output is not None:
        classifier = to_transformers(run.model)
        classifier.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        print(f"saved the reward model to {args.output}")


if __name__ == "__main__":
    main_guard(main)
