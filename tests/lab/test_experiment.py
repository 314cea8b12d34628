"""The experiment harness: one result type, runs cached by their code, and the two ways the
methods still to come plug in (a frozen reference, generating during training)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fieldguide.lab.experiment import (
    Presets,
    Technique,
    best_learning_rate,
    count_tokens,
    frozen_copy,
    keep_only_adapter,
    make_run,
    plateau_left_at,
    run_technique,
    step_seconds,
)
from fieldguide.lab.training import TrainConfig
from lab_factories import CONFIG, language_modelling


def test_a_run_reports_scores_gain_cost_and_size(micro_model, micro_tokenizer):
    run = run_technique(language_modelling(micro_tokenizer), micro_model, micro_tokenizer, CONFIG)
    assert run.before.n == run.after.n == 12
    assert run.after.value < run.before.value  # the held-out loss fell
    assert math.isclose(run.gain.value, run.after.value - run.before.value, abs_tol=1e-9)
    assert run.gain.low < run.gain.value < run.gain.high
    assert run.trainable_parameters == run.total_parameters == micro_model.num_parameters()
    # 8 steps of 4 unpadded blocks of 32 tokens each
    assert run.tokens_per_second == pytest.approx(8 * 4 * 32 / run.seconds)
    assert len(run.losses) == CONFIG.max_steps


def test_the_one_seed_makes_a_run_repeatable(micro_tokenizer):
    from fieldguide.lab.pretrain import build_model
    from lab_factories import micro_config

    runs = [
        run_technique(
            language_modelling(micro_tokenizer),
            build_model(micro_config(), micro_tokenizer),
            micro_tokenizer,
            CONFIG,
        )
        for _ in range(2)
    ]
    assert runs[0].losses == runs[1].losses


def test_presets_pick_the_tiny_settings_or_the_real_ones():
    presets = Presets(tiny=TrainConfig(learning_rate=1e-3), real=TrainConfig(learning_rate=2e-5, bf16=True))
    assert presets.for_model("tiny", "cpu") == presets.tiny
    assert presets.for_model("org/model", "cuda").bf16
    assert not presets.for_model("org/model", "cpu").bf16  # autocast to bf16 only where a GPU runs it
    assert presets.for_model("org/model", "cpu").learning_rate == 2e-5


def test_a_frozen_copy_never_trains(micro_model):
    reference = frozen_copy(micro_model)
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in micro_model.parameters())
    assert not reference.training


def test_a_method_that_generates_during_training_plugs_in_through_its_loss(micro_model, micro_tokenizer):
    """How PPO and GRPO will use the harness: the loss function samples, scores and updates.

    REINFORCE with a group-mean baseline, as GRPO uses: sample completions of each prompt from
    the model being trained, reward each by the share of its tokens drawn from a tenth of the
    vocabulary (a rule no model wrote), and push up the log-probability of the completions that
    beat their group's mean.
    """
    rewarded = len(micro_tokenizer) // 10  # token ids below this earn the reward

    def share_rewarded(completions: torch.Tensor) -> torch.Tensor:
        return (completions < rewarded).float().mean(dim=-1)  # (B,)

    def policy_gradient_loss(model, batch):
        prompts = batch["input_ids"]  # (B, P), equal lengths: no padding
        with torch.no_grad():  # the rollout: sample from the current policy
            sequences = model.generate(
                prompts.repeat_interleave(4, dim=0), do_sample=True, max_new_tokens=4, pad_token_id=0
            )  # (4B, P + 4)
        rewards = share_rewarded(sequences[:, prompts.shape[1] :]).view(-1, 4)  # (B, 4): groups of 4
        advantages = (rewards - rewards.mean(dim=1, keepdim=True)).flatten()  # (4B,)
        logits = model(input_ids=sequences).logits[:, prompts.shape[1] - 1 : -1]  # (4B, 4, V)
        logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, prompts.shape[1] :, None])
        per_token = -(advantages[:, None] * logprobs.squeeze(-1))  # (4B, 4)
        return per_token.sum(), per_token.numel()

    prompts = [{"input_ids": micro_tokenizer("the duck sees a")["input_ids"]}] * 8
    probe = torch.tensor([prompts[0]["input_ids"]])

    def reward_of_samples(model, tokenizer):
        with torch.no_grad():
            samples = model.generate(probe.repeat(64, 1), do_sample=True, max_new_tokens=4, pad_token_id=0)
        return share_rewarded(samples[:, probe.shape[1] :]).tolist()

    technique = Technique(
        data=lambda tokenizer: prompts,
        score=reward_of_samples,
        loss=policy_gradient_loss,
        collate=lambda examples: {"input_ids": torch.tensor([ex["input_ids"] for ex in examples])},
    )
    config = TrainConfig(max_steps=15, batch_size=4, learning_rate=3e-2, progress=False)
    run = run_technique(technique, micro_model, micro_tokenizer, config)
    assert run.gain.low > 0, run  # the reward rose, beyond its interval's doubt


def test_a_method_that_learns_from_each_rollout_several_times_plugs_in_through_its_sampler(
    micro_model, micro_tokenizer
):
    """How PPO will use the harness: the sampler generates, the loss replays the experience.

    Each rollout samples 4 completions of each of 4 prompts, rewards them by the rule above,
    and stores their log-probabilities; the sampler then yields that experience for 2 epochs
    of 4 minibatches, and the loss is PPO's clipped surrogate against the stored values.
    """
    rewarded = len(micro_tokenizer) // 10
    prompt = micro_tokenizer("the duck sees a")["input_ids"]
    P = len(prompt)

    def completion_logprobs(model, sequences):
        logits = model(input_ids=sequences).logits[:, P - 1 : -1]  # (B, 4, V)
        return F.log_softmax(logits.float(), dim=-1).gather(-1, sequences[:, P:, None]).squeeze(-1)

    def rollouts(model, dataset, config, start):
        while True:
            with torch.no_grad():
                prompts = torch.tensor([ex["input_ids"] for ex in dataset[:4]]).repeat_interleave(4, dim=0)
                sequences = model.generate(prompts, do_sample=True, max_new_tokens=4, pad_token_id=0)
                rewards = (sequences[:, P:] < rewarded).float().mean(dim=-1).view(4, 4)
                advantages = (rewards - rewards.mean(dim=1, keepdim=True)).flatten()
                old = completion_logprobs(model, sequences)
            experience = [
                {"sequence": s, "old_logprobs": o, "advantage": a}
                for s, o, a in zip(sequences, old, advantages, strict=True)
            ]
            for _ in range(2):  # epochs over one rollout
                for i in range(0, 16, 4):
                    yield experience[i : i + 4]

    def clipped_surrogate(model, batch):
        ratio = torch.exp(completion_logprobs(model, batch["sequence"]) - batch["old_logprobs"])  # (B, 4)
        advantage = batch["advantage"][:, None]
        objective = torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
        return -objective.sum(), objective.numel(), {"ratio": ratio.mean().item()}

    probe = torch.tensor([prompt])

    def reward_of_samples(model, tokenizer):
        with torch.no_grad():
            samples = model.generate(probe.repeat(64, 1), do_sample=True, max_new_tokens=4, pad_token_id=0)
        return (samples[:, P:] < rewarded).float().mean(dim=-1).tolist()

    technique = Technique(
        data=lambda tokenizer: [{"input_ids": prompt}] * 4,
        score=reward_of_samples,
        loss=clipped_surrogate,
        sampler=rollouts,
        collate=lambda examples: {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]},
    )
    config = TrainConfig(max_steps=24, batch_size=4, learning_rate=3e-2, progress=False)
    run = run_technique(technique, micro_model, micro_tokenizer, config)
    assert run.gain.low > 0, run  # the reward rose, beyond its interval's doubt
    # The loss function's own numbers are kept, one per micro-batch: the first minibatch of each
    # rollout is scored by the very model that sampled it, so its ratio is exactly 1.
    assert len(run.logs["ratio"]) == 24 and run.logs["ratio"][0] == pytest.approx(1.0)


def test_tokens_are_counted_by_the_batch_contract():
    ones = torch.ones(2, 3, dtype=torch.long)
    assert count_tokens({"input_ids": ones, "num_tokens": 4}) == 4
    assert count_tokens({"chosen_attention_mask": ones, "rejected_attention_mask": ones[:, :2]}) == 10
    assert count_tokens({"input_ids": ones}) == 6


def test_step_seconds_times_a_real_training_step_of_each_model(micro_model, micro_tokenizer):
    """Every model takes its steps (its weights move) and gets its own fastest time."""
    frozen_but_head = copy.deepcopy(micro_model).requires_grad_(False)
    frozen_but_head.lm_head.weight.requires_grad_(True)  # tied to the embedding: one matrix trains
    models = {"all": copy.deepcopy(micro_model).requires_grad_(True), "head": frozen_but_head}
    before = {
        name: [p.detach().clone() for p in m.parameters() if p.requires_grad] for name, m in models.items()
    }
    ids = torch.randint(0, len(micro_tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    seconds = step_seconds(models, {"input_ids": ids, "labels": ids}, rounds=2)
    assert list(seconds) == ["all", "head"] and all(value > 0 for value in seconds.values())
    for name, model in models.items():
        after = [p for p in model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(after, before[name], strict=True)), name


def test_keeping_only_the_adapter_drops_the_model_and_copies_its_tensors():
    model = torch.nn.Linear(3, 2)
    run = make_run(model, [1, 0], [1, 1], [0.5], 1.0, 10)
    run.model, run.tokenizer = model, object()
    kept = keep_only_adapter(run, lambda m: {"weight": m.weight})
    assert kept.model is None and kept.tokenizer is None
    assert torch.equal(kept.adapter["weight"], model.weight)
    model.weight.data.zero_()  # a copy, not the live parameter
    assert kept.adapter["weight"].abs().sum() > 0


def test_the_best_learning_rate_is_the_best_scored_and_the_lower_on_a_tie():
    scores = {1e-3: 0.6, 3e-3: 0.9, 1e-2: 0.9, 3e-2: 0.5}
    assert best_learning_rate(scores.get, scores) == 3e-3
    assert best_learning_rate(scores.get, [3e-2, 1e-3]) == 1e-3


def test_plateau_left_at_finds_the_first_window_below_the_line():
    losses = [0.69] * 100 + [0.1] * 100
    # The window's mean first drops below 0.6 once 8 of its 50 losses are 0.1: step 108.
    assert plateau_left_at(losses) == 108
    assert plateau_left_at(losses, window=1) == 101
    assert plateau_left_at([0.69] * 200) is None
    assert plateau_left_at([0.1] * 10) is None  # shorter than one window
