"""Targets by name, as PEFT's target_modules: the right layers, and a clear error for a wrong name."""

import pytest
import torch

from fieldguide.lab.layers import (
    linear_names,
    merge_and_unwrap,
    output_layer_name,
    replace_linear_layers,
    target_names,
    trained_state_dict,
)
from lab_factories import random_llama

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_the_names_a_target_can_take():
    model = random_llama()
    assert linear_names(model) == sorted([*ALL_LINEAR, "lm_head"])
    assert output_layer_name(model) == "lm_head"
    assert sorted(target_names(model, "all-linear")) == ALL_LINEAR  # the output layer left out
    assert target_names(model, "q_proj") == {"q_proj"}  # one name, not its letters


def test_every_layer_with_a_target_name_is_replaced_and_no_other():
    model = random_llama()
    replace_linear_layers(model, ["k_proj", "down_proj"], lambda name, layer: torch.nn.Sequential(layer))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Sequential))
    assert wrapped == [
        f"model.layers.{i}.{part}" for i in (0, 1) for part in ("mlp.down_proj", "self_attn.k_proj")
    ]


def test_a_target_that_names_no_layer_is_an_error_not_a_silent_no_op():
    with pytest.raises(ValueError, match=r"no linear layer is named \['qproj'\]; the model's are named"):
        replace_linear_layers(random_llama(), ["qproj", "v_proj"], lambda name, layer: layer)


class Doubled(torch.nn.Module):
    """A stand-in adapter: doubles its base layer's output, and merges by doubling the weight."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer, self.merged = base_layer, False

    def forward(self, x):
        return self.base_layer(x) if self.merged else 2 * self.base_layer(x)

    def merge(self):
        self.base_layer.weight.data *= 2
        self.base_layer.bias.data *= 2
        self.merged = True


def test_merging_and_unwrapping_leaves_a_plain_model_with_the_same_outputs():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[0], model[2] = Doubled(model[0]), Doubled(model[2])
    model[2].merge()  # one merged already: merged once, not twice
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = model(x)
        merge_and_unwrap(model, Doubled)
        assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear"]
        torch.testing.assert_close(model(x), expected)


def test_trained_state_dict_keeps_the_trainable_tensors_and_nothing_else():
    model = random_llama().requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    kept = trained_state_dict(model)
    assert sorted(kept) == ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    assert torch.equal(kept["model.norm.weight"], model.model.norm.weight)
    assert trained_state_dict(model.requires_grad_(False)) == {}
