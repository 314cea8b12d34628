"""Memory before the first step: counted from the tensors, and checked against the GPU's."""

import pytest
import torch

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import pack_texts, pad_batch
from fieldguide.lab.memory import (
    QWEN2_5_0_5B,
    check_fits,
    check_weights_fit,
    full_fine_tuning_bytes,
    static_training_bytes,
)
from fieldguide.lab.training import causal_lm_loss


def test_static_training_bytes_count_weights_gradients_and_adam(micro_model):
    n = micro_model.num_parameters()
    assert static_training_bytes(micro_model) == 4 * n + 12 * n  # float32: weight, gradient, two moments
    micro_model.requires_grad_(False)
    assert static_training_bytes(micro_model) == 4 * n


def test_the_count_equals_the_tensors_after_one_adamw_step(micro_model, micro_tokenizer):
    """After a step, AdamW holds exactly the state counted: a gradient and two moments a weight."""
    blocks = pack_texts(micro_tokenizer, make_corpus(20), block_size=32)
    optimizer = torch.optim.AdamW(micro_model.parameters())
    loss_sum, count = causal_lm_loss(micro_model, pad_batch(blocks[:2], micro_tokenizer.pad_token_id))
    (loss_sum / count).backward()
    optimizer.step()
    held = sum(t.numel() * t.element_size() for p in micro_model.parameters() for t in (p, p.grad))
    held += sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for name, value in state.items()
        if name != "step"  # a one-element step counter, not per weight
    )
    assert static_training_bytes(micro_model) == held


def test_the_meta_device_estimate_matches_a_built_model(micro_model):
    assert full_fine_tuning_bytes(micro_model.config) == static_training_bytes(micro_model)


def test_qwen2_5_0_5b_has_its_published_size():
    # The model card: 0.49B parameters; 16 bytes each for full fine-tuning with AdamW in float32.
    assert round(full_fine_tuning_bytes(QWEN2_5_0_5B) / 16 / 1e9, 2) == 0.49


def test_a_run_that_cannot_fit_is_refused_with_the_numbers():
    check_fits(need=10**9, free=2 * 10**9)
    with pytest.raises(ValueError, match=r"needs 8\.0 GB .* the GPU has 4\.0 GB free"):
        check_fits(need=8 * 10**9, free=4 * 10**9)


def test_a_model_too_large_for_the_gpu_is_refused_before_it_is_moved(micro_model, monkeypatch):
    """load_model checks the weights against the GPU's free memory before .to("cuda")."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (1000, 10**10))
    with pytest.raises(ValueError, match=r"loading this model needs 0\.0 GB for its weights alone"):
        check_weights_fit(micro_model, "cuda")
    check_weights_fit(micro_model, "cpu")  # nothing to check on the CPU


def test_check_memory_counts_the_weights_already_on_the_gpu_once(micro_model, monkeypatch):
    """After the weights moved to the GPU they are no longer free, and not needed twice."""
    from fieldguide.lab import memory

    weights, need = memory.weight_bytes(micro_model), static_training_bytes(micro_model)
    monkeypatch.setattr(memory, "_device_of", lambda model: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (need - weights, 10**10))
    memory.check_memory(micro_model)  # exactly enough: the gradients and the two moments
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (need - weights - 1, 10**10))
    with pytest.raises(ValueError, match="training this model needs"):
        memory.check_memory(micro_model)


def test_a_bf16_trainable_weight_costs_its_own_dtype(micro_model):
    micro_model.to(torch.bfloat16)
    assert static_training_bytes(micro_model) == 8 * micro_model.num_parameters()  # 2 + 3 x 2 bytes


def test_answering_needs_the_weights_in_their_dtype(micro_model):
    from fieldguide.lab.memory import inference_bytes

    assert inference_bytes(micro_model.config) == 2 * micro_model.num_parameters()  # bfloat16
    assert inference_bytes(micro_model.config, torch.float32) == 4 * micro_model.num_parameters()
