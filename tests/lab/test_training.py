"""The training loop: determinism, resume, gradient accumulation, and its clear errors."""

import math
from dataclasses import replace

import pytest
import torch

from fieldguide.lab.chat import encode_chat
from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import IGNORE_INDEX, pack_texts, pad_batch
from fieldguide.lab.pretrain import build_model, pretrain
from fieldguide.lab.tasks import instruction_task
from fieldguide.lab.training import (
    NonFiniteLossError,
    TrainConfig,
    accumulate_gradients,
    causal_lm_loss,
    cosine_schedule,
    enable_gradient_checkpointing,
    micro_batches,
    train,
)
from lab_factories import micro_config


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ in {different}"


def test_pretraining_twice_with_one_seed_gives_identical_weights():
    first, _ = pretrain(micro_config())
    second, _ = pretrain(micro_config())
    assert_same_weights(weights(first), weights(second))


def test_pretraining_with_another_seed_gives_other_weights():
    first, _ = pretrain(micro_config())
    other, _ = pretrain(micro_config(seed=1))
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def blocks(tokenizer):
    return pack_texts(tokenizer, make_corpus(60, seed=0), block_size=32)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(micro_tokenizer, tmp_path):
    config = TrainConfig(max_steps=10, batch_size=4, learning_rate=3e-3, warmup_steps=2, progress=False)
    uninterrupted = build_model(micro_config(), micro_tokenizer)
    train(uninterrupted, blocks(micro_tokenizer), config)

    # The same run, killed during step 8, after the checkpoint written at step 6.
    config = replace(config, checkpoint_dir=tmp_path, checkpoint_every=3)
    calls = 0

    def crashing_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == 8:
            raise KeyboardInterrupt
        return causal_lm_loss(model, batch)

    interrupted = build_model(micro_config(), micro_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, blocks(micro_tokenizer), config, loss_fn=crashing_loss)

    resumed = build_model(micro_config(), micro_tokenizer)  # a new process would start afresh
    losses = train(resumed, blocks(micro_tokenizer), config)
    assert len(losses) == 10
    assert_same_weights(weights(uninterrupted), weights(resumed))


def test_micro_batches_started_midway_continue_the_full_sequence():
    data = list(range(10))
    full = micro_batches(data, batch_size=3, seed=5)
    expected = [next(full) for _ in range(7)]
    resumed = micro_batches(data, batch_size=3, seed=5, start=4)
    assert [next(resumed) for _ in range(3)] == expected[4:]


def gradients(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_accumulating_micro_batches_matches_one_large_batch(micro_tokenizer):
    # Instruction examples differ in length, so the micro-batches hold different numbers of
    # target tokens: exactly the case naive per-batch averaging gets wrong.
    examples = [encode_chat(micro_tokenizer, ex.prompt, ex.response) for ex in instruction_task().train[:12]]
    pad = micro_tokenizer.pad_token_id
    model = build_model(micro_config(), micro_tokenizer)

    accumulate_gradients(model, [pad_batch(examples[i : i + 4], pad) for i in range(0, 12, 4)])
    accumulated = gradients(model)
    model.zero_grad()
    accumulate_gradients(model, [pad_batch(examples, pad)])
    large_batch = gradients(model)

    for small, large in zip(accumulated, large_batch, strict=True):
        torch.testing.assert_close(small, large, atol=1e-5, rtol=0)


def test_naive_per_batch_averaging_would_fail_that_comparison(micro_tokenizer):
    """The check above can fail: averaging each micro-batch's loss gives another gradient."""
    examples = [encode_chat(micro_tokenizer, ex.prompt, ex.response) for ex in instruction_task().train[:12]]
    batches = [pad_batch(examples[i : i + 4], micro_tokenizer.pad_token_id) for i in range(0, 12, 4)]
    model = build_model(micro_config(), micro_tokenizer)
    for batch in batches:
        loss_sum, count = causal_lm_loss(model, batch)
        (loss_sum / count / len(batches)).backward()
    naive = gradients(model)
    model.zero_grad()
    accumulate_gradients(model, batches)
    correct = gradients(model)
    assert max((a - b).abs().max().item() for a, b in zip(naive, correct, strict=True)) > 1e-5


def test_non_finite_loss_stops_training_with_a_clear_error(micro_model, micro_tokenizer):
    def exploding_loss(model, batch):
        loss_sum, count = causal_lm_loss(model, batch)
        return loss_sum * float("inf"), count

    config = TrainConfig(max_steps=3, batch_size=4, progress=False)
    with pytest.raises(
        NonFiniteLossError, match=r"loss is inf at step 0, micro-batch 0: lower the learning rate"
    ):
        train(micro_model, blocks(micro_tokenizer), config, loss_fn=exploding_loss)


def test_a_step_whose_labels_are_all_masked_is_an_error(micro_model, micro_tokenizer):
    masked = [{**block, "labels": [IGNORE_INDEX] * len(block["labels"])} for block in blocks(micro_tokenizer)]
    config = TrainConfig(max_steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="every label in its batches is masked"):
        train(micro_model, masked, config)


def test_a_dataset_smaller_than_one_batch_is_an_error(micro_model, micro_tokenizer):
    config = TrainConfig(max_steps=1, batch_size=1000, progress=False)
    with pytest.raises(ValueError, match="cannot fill one batch of 1000"):
        train(micro_model, blocks(micro_tokenizer), config)


def test_training_lowers_the_loss(micro_model, micro_tokenizer):
    config = TrainConfig(max_steps=30, batch_size=8, learning_rate=1e-2, progress=False)
    losses = train(micro_model, blocks(micro_tokenizer), config)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_gradient_checkpointing_gives_the_same_gradients(micro_tokenizer):
    """Recomputing activations in the backward pass saves memory and changes no number."""
    batch = pad_batch(blocks(micro_tokenizer)[:4], micro_tokenizer.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        model = build_model(micro_config(), micro_tokenizer)
        if checkpointing:
            enable_gradient_checkpointing(model)
            # the attribute's name since transformers 5.23, and before it
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model.train()
        accumulate_gradients(model, [batch])
        grads.append(gradients(model))
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=0)


def test_gradient_checkpointing_refuses_a_module_that_cannot_do_it():
    with pytest.raises(ValueError, match="gradient checkpointing needs a transformers model"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_bf16_autocast_trains_float32_weights(micro_model, micro_tokenizer):
    """Mixed precision: the arithmetic in bfloat16, the weights and their updates in float32."""
    config = TrainConfig(max_steps=2, batch_size=4, bf16=True, progress=False)
    before = weights(micro_model)
    losses = train(micro_model, blocks(micro_tokenizer), config)
    assert all(math.isfinite(loss) for loss in losses)
    assert {p.dtype for p in micro_model.parameters()} == {torch.float32}
    assert any(not torch.equal(before[k], v) for k, v in micro_model.state_dict().items())


def test_a_run_shorter_than_its_warm_up_still_reaches_its_peak_rate():
    multiplier = cosine_schedule(TrainConfig(max_steps=10, warmup_steps=30))
    rates = [multiplier(step) for step in range(10)]
    assert max(rates) == 1.0 and rates.index(1.0) == 4  # warm-up over half the run: steps 0-4
    assert rates[-1] < rates[5]  # then the decay


def test_without_a_progress_bar_a_log_line_marks_the_steps(micro_model, micro_tokenizer, capsys):
    config = TrainConfig(max_steps=4, batch_size=4, progress=False, log_every=2)
    train(micro_model, blocks(micro_tokenizer), config)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0].strip() for line in lines] == ["step 2/4", "step 4/4"]
