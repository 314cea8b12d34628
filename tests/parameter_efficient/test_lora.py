"""Our LoRA against PEFT's: the same outputs from the same weights, the same weights after the
same training steps, merging that changes nothing, and the failures a reader would otherwise
meet silently."""

import copy
import math

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
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    peft_model_with,
    to_peft_state_dict,
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
        scale = lora_layers(ours)[0].scaling
        if math.log2(scale).is_integer():
            # Scaling by a power of two is exact, so scaling before B (ours) or after it (PEFT's)
            # gives the same numbers: equal to the last bit, not merely close.
            assert torch.equal(ours(ids).logits, theirs(ids).logits)
        else:  # any other scale rounds differently in the two orders
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-6, rtol=0)
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


def test_the_first_adamw_step_moves_b_by_the_learning_rate_against_its_gradients_sign():
    """The derivation of the page's first-step equation: B = 0, so only B moves, and AdamW's first
    step is lr * g / (|g| + eps), the sign of g wherever |g| is well above eps = 1e-8."""
    torch.manual_seed(0)
    model = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=token_batch(), labels=token_batch()).loss.backward()
    gradients = {
        id(layer): (layer.lora_A.weight.grad, layer.lora_B.weight.grad.clone())
        for layer in lora_layers(model)
    }
    optimizer.step()
    for layer in lora_layers(model):
        grad_A, grad_B = gradients[id(layer)]
        assert grad_A is None or not grad_A.any()  # A's gradient is scaling * B^T ..., and B is zero
        assert torch.equal(torch.sign(layer.lora_B.weight), -torch.sign(grad_B))
        expected = -1e-3 * grad_B / (grad_B.abs() + 1e-8)
        torch.testing.assert_close(layer.lora_B.weight, expected, atol=1e-9, rtol=1e-5)


def test_an_adapter_switched_in_gives_the_model_it_was_trained_as():
    first, second = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8), None
    for layer in lora_layers(first):  # a non-zero B, so the adapter changes the outputs
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    second = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8)
    ids = token_batch()
    with torch.no_grad():
        assert not torch.equal(second(ids).logits, first(ids).logits)
        load_adapter(second, lora_state_dict(first))
        assert torch.equal(second(ids).logits, first(ids).logits)


def test_an_adapter_of_another_rank_or_set_of_layers_is_refused():
    model = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8)
    other_rank = lora_state_dict(add_lora(random_llama(), "all-linear", r=2, lora_alpha=8))
    with pytest.raises(ValueError, match=r"lora_A\.weight is \(2, 32\) in the adapter, \(4, 32\) here"):
        load_adapter(model, other_rank)
    other_layers = lora_state_dict(add_lora(random_llama(), ["q_proj"], r=4, lora_alpha=8))
    with pytest.raises(ValueError, match="do not match this model's LoRA layers"):
        load_adapter(model, other_layers)


def test_our_adapter_names_round_trip_through_peft_names():
    adapter = lora_state_dict(add_lora(random_llama(), ["q_proj", "v_proj"], r=2, lora_alpha=4))
    assert from_peft_state_dict(to_peft_state_dict(adapter)).keys() == adapter.keys()


def test_a_mixed_batch_gives_each_row_its_own_adapter():
    """PEFT's mixed batch, loaded with two of our adapters: each row as that adapter alone gives it."""
    adapters = {}
    for seed, name in enumerate(["one", "two"]):
        ours = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8)
        generator = torch.Generator().manual_seed(seed)
        for layer in lora_layers(ours):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1, generator=generator)
        adapters[name] = lora_state_dict(ours)
    model = peft_model_with(random_llama(), adapters, r=4, lora_alpha=8)
    ids, names = token_batch(batch=3), ["two", "__base__", "one"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        with model.disable_adapter():
            alone = {"__base__": model(input_ids=ids).logits}
        for name in adapters:
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
    assert not torch.allclose(alone["one"], alone["two"])
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-6, rtol=0)


def test_peft_refuses_nothing_silently_when_loading_our_adapter():
    adapter = lora_state_dict(add_lora(random_llama(), ["q_proj"], r=4, lora_alpha=8))
    adapter["model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)  # not a LoRA weight
    with pytest.raises(ValueError, match="PEFT did not use"):
        peft_model_with(random_llama(), {"only": adapter}, r=4, lora_alpha=8)


def test_an_adapter_is_not_loaded_into_merged_layers():
    model = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8)
    adapter = lora_state_dict(model)
    lora_layers(model)[0].merge()
    with pytest.raises(RuntimeError, match="1 LoRA layers are merged; unmerge them"):
        load_adapter(model, adapter)


def test_the_first_step_lowers_the_loss_by_the_pages_equation():
    """eq-lora-first-step: with a small rate, one AdamW step lowers the loss by
    eta * sum over layers of s * sum |G A^T|, G being the frozen weight's gradient."""
    torch.manual_seed(0)
    model = add_lora(random_llama(), "all-linear", r=4, lora_alpha=8).train()
    ids, rate = token_batch(), 1e-4
    for layer in lora_layers(model):  # only to read G; the step below moves A and B alone
        layer.base_layer.weight.requires_grad_(True)
    before = model(input_ids=ids, labels=ids).loss
    before.backward()
    predicted = sum(
        rate * layer.scaling * (layer.base_layer.weight.grad @ layer.lora_A.weight.T).abs().sum()
        for layer in lora_layers(model)
    )
    for layer in lora_layers(model):
        layer.base_layer.weight.requires_grad_(False).grad = None
    adapters = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW(adapters, lr=rate, eps=1e-12, weight_decay=0.0).step()
    with torch.no_grad():
        drop = before - model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(drop, predicted.detach(), rtol=0.02, atol=0)
