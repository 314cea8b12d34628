"""Our LoRA against PEFT's: the same outputs from the same weights, the same weights after the
same training steps, merging that changes nothing, and the failures a reader would otherwise
meet silently."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file

from fieldguide.lab.training import TrainConfig, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.lora import (
    LoraLinear,
    add_lora,
    from_peft_state_dict,
    linear_names,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
)
from lab_factories import random_llama, random_qwen2

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# target modules, r, lora_alpha, use_rslora
CASES = [
    (["q_proj", "v_proj"], 8, 16, False),  # the original paper's choice
    ("all-linear", 4, 8, False),  # PEFT's shorthand: every linear layer but the output
    (ALL_LINEAR, 4, 8, False),  # what PEFT's "all-linear" picks in a Llama block
    (["o_proj", "down_proj"], 2, 5, True),  # rsLoRA: alpha / sqrt(r)
    (["q_proj"], 1, 1, False),
]
IDS = ["qv-r8", "all-linear-shorthand-r4", "all-linear-r4", "rslora-r2", "q-r1"]


def pair(targets, r, alpha, rslora, seed=0, base=None):
    """PEFT's LoRA model and ours on copies of one base, with identical, non-zero A and B."""
    base = random_llama(seed) if base is None else base
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0)
    theirs = get_peft_model(copy.deepcopy(base), config)
    ours = add_lora(copy.deepcopy(base), targets, r=r, lora_alpha=alpha, use_rslora=rslora)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, module in theirs.named_modules():
        if isinstance(module, PeftLoraLinear):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            # B starts at zero in both; a random B makes the comparison test the update's path.
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1, generator=generator)
            mine.lora_A.weight.data.copy_(module.lora_A["default"].weight)
            mine.lora_B.weight.data.copy_(module.lora_B["default"].weight)
    return theirs, ours


def token_batch(seed: int = 0, batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_same_weights_give_the_same_logits(targets, r, alpha, rslora):
    theirs, ours = pair(targets, r, alpha, rslora)
    ids = token_batch()
    with torch.no_grad():
        # The same operations in the same order: equal to the last bit, not merely close.
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        # and the update's path is exercised: without it, the logits would be the base's.
        with theirs.disable_adapter():
            assert (ours(ids).logits - theirs(ids).logits).abs().max() > 1e-3


def test_a_base_with_biases_gives_the_same_logits():
    """Qwen2's query, key and value projections have biases, which LoRA leaves frozen."""
    base = random_qwen2()
    assert base.model.layers[0].self_attn.q_proj.bias is not None
    theirs, ours = pair(["q_proj", "v_proj"], 4, 8, False, base=base)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert not any(p.requires_grad for name, p in ours.named_parameters() if name.endswith("bias"))


def test_an_adapter_saved_by_peft_loads_into_ours(tmp_path):
    theirs, _ = pair(ALL_LINEAR, 4, 8, False)
    theirs.save_pretrained(tmp_path)
    ours = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8)
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    missing, unexpected = ours.load_state_dict(from_peft_state_dict(adapter), strict=False)
    assert unexpected == [] and not [name for name in missing if "lora_" in name]
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_a_bfloat16_base_trains_float32_adapters():
    """A frozen base in bfloat16 halves its memory; A and B stay float32 and still train."""
    model = add_lora(random_llama().to(torch.bfloat16), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    layer = lora_layers(model)[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    data = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in token_batch(seed=5, batch=4)]
    before = layer.lora_B.weight.detach().clone()
    train(model, data, TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, progress=False))
    assert not torch.equal(layer.lora_B.weight, before)
    layer.merge()  # the float32 update, rounded into the bfloat16 weight
    assert layer.base_layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_scaling_and_trainable_parameters_match_peft_and_the_formula(targets, r, alpha, rslora):
    theirs, ours = pair(targets, r, alpha, rslora)
    peft_scalings = {m.scaling["default"] for m in theirs.modules() if isinstance(m, PeftLoraLinear)}
    assert peft_scalings == {layer.scaling for layer in lora_layers(ours)}
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    formula = sum(
        r * (layer.base_layer.in_features + layer.base_layer.out_features) for layer in lora_layers(ours)
    )
    assert trainable == formula == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_same_training_steps_give_the_same_weights(targets, r, alpha, rslora):
    theirs, ours = pair(targets, r, alpha, rslora)
    data = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in token_batch(seed=5, batch=8)]
    config = TrainConfig(max_steps=4, batch_size=4, learning_rate=1e-2, progress=False)
    start = {name: p.detach().clone() for name, p in ours.named_parameters() if p.requires_grad}
    train(theirs, data, config)
    train(ours, data, config)
    for name, module in theirs.named_modules():
        if isinstance(module, PeftLoraLinear):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            assert (mine.lora_A.weight - module.lora_A["default"].weight).abs().max() < 1e-4
            assert (mine.lora_B.weight - module.lora_B["default"].weight).abs().max() < 1e-4
    moved = max((p - start[name]).abs().max() for name, p in ours.named_parameters() if p.requires_grad)
    assert moved > 1e-3  # the steps changed the weights far beyond the tolerance above


def test_a_fresh_adapter_leaves_the_model_unchanged():
    """B starts at zero, so before any training the adapted model is the base model."""
    base = random_llama()
    ours = add_lora(copy.deepcopy(base), ALL_LINEAR, r=4, lora_alpha=8)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, base(ids).logits)
    assert all(layer.lora_A.weight.abs().sum() > 0 for layer in lora_layers(ours))  # A is not zero


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_merging_changes_no_output_and_unmerging_restores_the_weights(targets, r, alpha, rslora):
    _, ours = pair(targets, r, alpha, rslora)
    ids = token_batch()
    originals = {id(layer): layer.base_layer.weight.detach().clone() for layer in lora_layers(ours)}
    with torch.no_grad():
        unmerged = ours(ids).logits
        for layer in lora_layers(ours):
            layer.merge()
        assert (ours(ids).logits - unmerged).abs().max() < 1e-5
        for layer in lora_layers(ours):
            layer.unmerge()
            assert (layer.base_layer.weight - originals[id(layer)]).abs().max() < 1e-6


def test_merge_and_unload_matches_peft():
    theirs, ours = pair(ALL_LINEAR, 4, 8, False)
    ids = token_batch()
    with torch.no_grad():
        plain_theirs = theirs.merge_and_unload()
        plain_ours = merge_and_unload(ours)
        assert not lora_layers(plain_ours)
        assert (plain_ours(ids).logits - plain_theirs(ids).logits).abs().max() < 1e-5


def test_merging_twice_and_unmerging_an_unmerged_layer_are_refused():
    layer = LoraLinear(torch.nn.Linear(4, 3), r=2, lora_alpha=2)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="merged already"):
        layer.merge()


def test_the_adapter_alone_is_what_gets_saved():
    _, ours = pair(["q_proj", "v_proj"], 8, 16, False)
    adapter = lora_state_dict(ours)
    assert len(adapter) == 2 * 2 * 2  # A and B, two projections, two layers
    assert sum(t.numel() for t in adapter.values()) == sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    )


def test_a_target_that_names_no_layer_is_an_error_not_a_silent_no_op():
    with pytest.raises(ValueError, match=r"no linear layer is named \[.qproj.\]"):
        add_lora(random_llama(), ["qproj", "v_proj"])
    assert linear_names(random_llama()) == sorted([*ALL_LINEAR, "lm_head"])


def test_a_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="positive integer"):
        LoraLinear(torch.nn.Linear(4, 3), r=0, lora_alpha=1)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_every_adapter_weight_trains_and_no_base_weight_moves(checkpointing):
    """With the embeddings frozen, no input to a checkpointed layer needs a gradient; the lab's
    loop must still reach every A and B (PEFT's users meet this as a loss that never falls)."""
    base = random_llama()
    model = add_lora(copy.deepcopy(base), ALL_LINEAR, r=4, lora_alpha=8)
    if checkpointing:
        enable_gradient_checkpointing(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in token_batch(seed=5, batch=4)]
    train(model, data, TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        # B moves on step 1; A only from step 2, once B is no longer zero.
        assert moved == p.requires_grad, name
