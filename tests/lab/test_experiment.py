"""The experiment harness: one result type, runs cached by their code, and the two ways the
methods still to come plug in (a frozen reference, generating during training)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fieldguide.lab import experiment
from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import pack_texts
from fieldguide.lab.experiment import (
    Presets,
    Technique,
    cached,
    frozen_copy,
    run_technique,
)
from fieldguide.lab.metrics import text_losses
from fieldguide.lab.training import TrainConfig

CONFIG = TrainConfig(max_steps=8, batch_size=4, learning_rate=1e-2, progress=False)


def language_modelling(tokenizer) -> Technique:
    """Plain next-token prediction, scored by each held-out story's loss."""
    heldout = make_corpus(12, seed=99)
    return Technique(
        data=lambda tokenizer: pack_texts(tokenizer, make_corpus(60, seed=0), block_size=32),
        score=lambda model, tokenizer: text_losses(model, tokenizer, heldout),
    )


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


def test_a_cached_run_is_computed_once_and_read_back(micro_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    calls = []

    @cached
    def tiny_run(steps: int = 3):
        from fieldguide.lab.pretrain import build_model
        from lab_factories import micro_config

        calls.append(steps)
        model = build_model(micro_config(), micro_tokenizer)
        config = TrainConfig(max_steps=steps, batch_size=4, progress=False)
        return run_technique(
            language_modelling(micro_tokenizer), model, micro_tokenizer, config, keep_model=True
        )

    first = tiny_run()
    second = tiny_run(steps=3)  # the same arguments, spelt differently: the same run
    assert calls == [3]
    assert second == first  # every number, read back from disk
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    tiny_run(steps=4)
    assert calls == [3, 4]


def test_changing_the_code_invalidates_a_cached_run(monkeypatch):
    before = experiment.code_hash()
    monkeypatch.setattr(experiment, "tiny_model_dir", lambda: experiment.Path("another-model"))
    assert experiment.code_hash() != before


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


def test_a_cached_dict_of_runs_keeps_its_order(micro_model, micro_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    one = run_technique(language_modelling(micro_tokenizer), micro_model, micro_tokenizer, CONFIG)

    @cached
    def several():
        return {"zeta": one, "alpha": one}

    assert list(several()) == ["zeta", "alpha"]
    assert list(several()) == ["zeta", "alpha"]  # read back from disk, in the same order
