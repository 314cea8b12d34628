"""Our DoRA against PEFT's (LoraConfig(use_dora=True)): the same outputs from the same weights,
the same weights after the same training steps, merging that changes nothing, and the paper's
definition checked on its own."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file

from fieldguide.lab.training import TrainConfig, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.dora import DoraLinear, add_dora
from fieldguide.parameter_efficient.lora import (
    from_peft_state_dict,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
)
from lab_factories import random_llama, random_qwen2

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# target modules, r, lora_alpha, use_rslora
CASES = [
    (["q_proj", "v_proj"], 8, 16, False),
    ("all-linear", 4, 8, False),
    (["o_proj", "down_proj"], 2, 5, True),
]
IDS = ["qv-r8", "all-linear-r4", "rslora-r2"]


def pair(targets, r, alpha, rslora, base=None):
    """PEFT's DoRA model and ours on copies of one base, with identical non-trivial weights:
    a random B (so the update matters) and magnitudes moved away from the rows' lengths."""
    base = random_llama() if base is None else base
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, use_dora=True)
    theirs = get_peft_model(copy.deepcopy(base), config)
    ours = add_dora(copy.deepcopy(base), targets, r=r, lora_alpha=alpha, use_rslora=rslora)
    generator = torch.Generator().manual_seed(1)
    for name, module in theirs.named_modules():
        if isinstance(module, PeftLoraLinear):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1, generator=generator)
            magnitude = module.lora_magnitude_vector["default"].weight
            magnitude.data *= 1 + 0.2 * torch.rand(magnitude.shape, generator=generator)
            mine.lora_A.weight.data.copy_(module.lora_A["default"].weight)
            mine.lora_B.weight.data.copy_(module.lora_B["default"].weight)
            mine.lora_magnitude_vector.data.copy_(magnitude)
    return theirs, ours


def token_batch(seed: int = 0, batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def training_data(batch: int = 8) -> list[dict]:
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in token_batch(seed=5, batch=batch)]


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_same_weights_give_the_same_logits(targets, r, alpha, rslora):
    theirs, ours = pair(targets, r, alpha, rslora)
    ids = token_batch()
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-5
        with theirs.disable_adapter():  # and DoRA's path is exercised: the base's logits differ
            assert (ours(ids).logits - theirs(ids).logits).abs().max() > 1e-3


def test_a_base_with_biases_gives_the_same_logits():
    """The bias stays outside DoRA's scaling: b + (m / ||W0 + s B A||) (W0 + s B A) x."""
    theirs, ours = pair(["q_proj", "v_proj"], 4, 8, False, base=random_qwen2())
    ids = token_batch()
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-5


def test_the_layer_is_the_papers_definition():
    """W' = m * (W0 + s B A) / ||W0 + s B A||, the norm of each output's row, applied to x."""
    torch.manual_seed(0)
    layer = DoraLinear(torch.nn.Linear(6, 5), r=2, lora_alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.lora_magnitude_vector.data = torch.rand(5) + 0.5
    weight = layer.base_layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    direction = weight / weight.norm(dim=1, keepdim=True)
    x = torch.randn(4, 6)
    expected = x @ (layer.lora_magnitude_vector[:, None] * direction).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_a_fresh_adapter_leaves_the_model_unchanged():
    """B = 0 and m = ||W0|| row by row, so before training the model is the base model."""
    base = random_llama()
    ours = add_dora(copy.deepcopy(base), "all-linear", r=4, lora_alpha=8)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, base(ids).logits)  # the factor is exactly 1, the update 0
    for layer in lora_layers(ours):
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_trainable_parameters_match_peft_and_the_formula(targets, r, alpha, rslora):
    theirs, ours = pair(targets, r, alpha, rslora)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    # LoRA's r (d_in + d_out) plus one magnitude per output
    formula = sum(
        r * (layer.base_layer.in_features + layer.base_layer.out_features) + layer.base_layer.out_features
        for layer in lora_layers(ours)
    )
    assert trainable == formula == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_same_training_steps_give_the_same_weights(targets, r, alpha, rslora):
    theirs, ours = pair(targets, r, alpha, rslora)
    config = TrainConfig(max_steps=4, batch_size=4, learning_rate=1e-2, progress=False)
    start = {name: p.detach().clone() for name, p in ours.named_parameters() if p.requires_grad}
    train(theirs, training_data(), config)
    train(ours, training_data(), config)
    for name, module in theirs.named_modules():
        if isinstance(module, PeftLoraLinear):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            assert (mine.lora_A.weight - module.lora_A["default"].weight).abs().max() < 1e-4
            assert (mine.lora_B.weight - module.lora_B["default"].weight).abs().max() < 1e-4
            magnitude = module.lora_magnitude_vector["default"].weight
            assert (mine.lora_magnitude_vector - magnitude).abs().max() < 1e-4
    moved = max((p - start[name]).abs().max() for name, p in ours.named_parameters() if p.requires_grad)
    assert moved > 1e-3


@pytest.mark.parametrize(("targets", "r", "alpha", "rslora"), CASES, ids=IDS)
def test_merging_changes_no_output_and_unmerging_restores_the_weights(targets, r, alpha, rslora):
    _, ours = pair(targets, r, alpha, rslora)
    ids = token_batch()
    original = {name: p.detach().clone() for name, p in ours.named_parameters()}
    with torch.no_grad():
        unmerged = ours(ids).logits
        for layer in lora_layers(ours):
            layer.merge()
        torch.testing.assert_close(ours(ids).logits, unmerged, atol=1e-5, rtol=0)
        for layer in lora_layers(ours):
            layer.unmerge()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, original[name], atol=1e-6, rtol=0)


def test_merge_and_unload_matches_peft():
    theirs, ours = pair(ALL_LINEAR, 4, 8, False)
    ids = token_batch()
    with torch.no_grad():
        merged_theirs = theirs.merge_and_unload()(ids).logits
        plain = merge_and_unload(ours)
        assert not lora_layers(plain)
        torch.testing.assert_close(plain(ids).logits, merged_theirs, atol=1e-5, rtol=0)


def test_an_adapter_saved_by_peft_loads_into_ours(tmp_path):
    theirs, _ = pair(ALL_LINEAR, 4, 8, False)
    theirs.save_pretrained(tmp_path)
    adapter = from_peft_state_dict(load_file(tmp_path / "adapter_model.safetensors"))
    ours = load_adapter(add_dora(random_llama(), "all-linear", r=4, lora_alpha=8), adapter)
    assert lora_state_dict(ours).keys() == adapter.keys()  # magnitudes included
    ids = token_batch()
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-5


def test_the_norm_passes_no_gradient():
    """Liu et al. treat ||W0 + s B A|| as a constant in backward; so do PEFT and we. The magnitude's
    gradient is then the output's gradient times the unit direction's output, nothing more."""
    torch.manual_seed(0)
    layer = DoraLinear(torch.nn.Linear(6, 5, bias=False), r=2, lora_alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    weight = (layer.base_layer.weight + layer.get_delta_weight()).detach()
    unit_outputs = x @ (weight / weight.norm(dim=1, keepdim=True)).T  # (4, 5)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, unit_outputs.sum(dim=0))


def test_a_bfloat16_base_keeps_float32_magnitudes():
    model = add_dora(random_llama().to(torch.bfloat16), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    layer = lora_layers(model)[0]
    assert layer.lora_magnitude_vector.dtype == torch.float32
    with torch.no_grad():
        assert model(token_batch()).logits.dtype == torch.bfloat16
    train(model, training_data(4), TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, progress=False))
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_every_adapter_weight_trains_and_no_base_weight_moves(checkpointing):
    model = add_dora(random_llama(), ALL_LINEAR, r=4, lora_alpha=8)
    if checkpointing:
        enable_gradient_checkpointing(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, training_data(4), TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name


def test_merging_twice_is_refused():
    layer = DoraLinear(torch.nn.Linear(4, 3), r=1, lora_alpha=1)
    layer.merge()
    with pytest.raises(RuntimeError, match="merged already"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_the_same_outputs_under_dropout():
    """With dropout, W0 sees the dropped input too (PEFT recomputes it); the same seed gives both
    layers the same mask, so the outputs agree."""
    theirs = get_peft_model(
        random_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, lora_dropout=0.5),
    )
    ours = add_dora(random_llama(), ["q_proj"], r=4, lora_alpha=8, lora_dropout=0.5)
    for name, module in theirs.named_modules():
        if isinstance(module, PeftLoraLinear):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            torch.nn.init.normal_(
                module.lora_B["default"].weight, std=0.1, generator=torch.Generator().manual_seed(1)
            )
            mine.lora_A.weight.data.copy_(module.lora_A["default"].weight)
            mine.lora_B.weight.data.copy_(module.lora_B["default"].weight)
    theirs.train(), ours.train()
    ids = token_batch()
    with torch.no_grad():
        torch.manual_seed(3)
        theirs_logits = theirs(ids).logits
        torch.manual_seed(3)
        ours_logits = ours(ids).logits
        torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-5, rtol=0)
        torch.manual_seed(4)  # another mask: the dropout path really is taken
        assert (ours(ids).logits - ours_logits).abs().max() > 1e-4
