"""Our merges against PEFT's: the same merged tensors from ``peft.utils.merge_utils`` on a table
of cases, the same merged delta weights from ``add_weighted_adapter`` on two LoRA adapters,
and the papers' definitions checked on small tensors worked by hand."""

import copy

import pytest
import torch
from peft.utils import merge_utils

from fieldguide.parameter_efficient.lora import add_lora, lora_layers, lora_state_dict, peft_model_with
from fieldguide.parameter_efficient.merging import (
    dare_linear,
    dare_ties,
    drop_and_rescale,
    elect_sign,
    lora_task_vector,
    merge_task_vectors,
    merged_model,
    task_arithmetic,
    ties,
    trim,
)
from lab_factories import random_llama


def task_tensors(seed: int = 0, tasks: int = 3, shape=(6, 10)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(tasks)]


WEIGHTS = [0.7, 1.0, -0.4]  # a negative weight subtracts a task, as in task negation


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_merges_equal_peft(density):
    tensors = task_tensors()
    weights = torch.tensor(WEIGHTS)
    torch.testing.assert_close(
        task_arithmetic(tensors, WEIGHTS), merge_utils.task_arithmetic(tensors, weights)
    )
    for method in ("total", "frequency"):
        theirs = merge_utils.ties(tensors, weights, density, majority_sign_method=method)
        torch.testing.assert_close(ties(tensors, WEIGHTS, density, method), theirs)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_equals_peft_on_the_same_random_drops(density):
    """PEFT draws DARE's drops from PyTorch's global generator; ours from the one it is given.
    Seeded alike, the two draw the same drops, so the merges must be equal."""
    tensors, weights = task_tensors(), torch.tensor(WEIGHTS)
    torch.manual_seed(5)
    theirs = merge_utils.dare_linear(tensors, weights, density)
    ours = dare_linear(tensors, WEIGHTS, density, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs)
    torch.manual_seed(6)
    theirs = merge_utils.dare_ties(tensors, weights, density, majority_sign_method="total")
    ours = dare_ties(tensors, WEIGHTS, density, "total", torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours, theirs)


def test_trim_keeps_the_largest_entries():
    tensor = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    assert torch.equal(trim(tensor, 0.5), torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]))
    assert torch.equal(trim(tensor, 0.0), torch.zeros_like(tensor))


def test_sign_election_and_disjoint_mean_by_hand():
    """Three tasks, four entries: the elected sign is the sign of the sum ("total") or of the
    votes ("frequency"); the mean is over the tasks that agree with it."""
    stacked = torch.tensor([[1.0, -4.0, 2.0, 0.0], [2.0, 1.0, -1.0, 0.0], [-6.0, 1.0, -1.0, 0.0]])
    agree = elect_sign(stacked, "total")  # sums: -3, -2, 0, 0 -> signs -, -, +, +
    assert agree.tolist() == [
        [False, True, True, False],
        [False, False, False, False],
        [True, False, False, False],
    ]
    votes = elect_sign(stacked, "frequency")  # votes: +1, +1, -1, 0 -> signs +, +, -, +
    assert votes.tolist() == [
        [True, False, False, False],
        [True, True, True, False],
        [False, True, True, False],
    ]
    merged = ties([t for t in stacked], [1.0, 1.0, 1.0], density=1.0)
    assert merged.tolist() == [-6.0, -4.0, 2.0, 0.0]  # each entry: the agreeing tasks' mean


def test_drop_and_rescale_keeps_the_expected_value():
    tensor = torch.ones(200_000)
    dropped = drop_and_rescale(tensor, 0.1, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0.0, 10.0}
    assert abs(dropped.mean().item() - 1.0) < 0.03  # 200,000 draws: standard error about 0.007


def two_adapters(seed: int = 0):
    """Our two LoRA models on copies of one random Llama, with B moved off its zero start."""
    base = random_llama()
    adapters = []
    for offset in range(2):
        torch.manual_seed(seed + offset)
        model = add_lora(copy.deepcopy(base), "all-linear", r=4, lora_alpha=8)
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
        adapters.append(lora_state_dict(model))
    return base, adapters


def peft_with(base, adapters):
    """The LoRA page's PEFT model holding both adapters, named "first" and "second"."""
    return peft_model_with(
        copy.deepcopy(base), dict(zip(["first", "second"], adapters, strict=True)), r=4, lora_alpha=8
    )


@pytest.mark.parametrize(
    ("combination", "merge"),
    [
        ("svd", lambda tensors: task_arithmetic(tensors, [0.7, 1.0])),
        ("ties_svd", lambda tensors: ties(tensors, [0.7, 1.0], 0.3)),
        ("magnitude_prune_svd", lambda tensors: task_arithmetic([trim(t, 0.3) for t in tensors], [0.7, 1.0])),
    ],
)
def test_merged_delta_weights_equal_peft_add_weighted_adapter(combination, merge):
    """PEFT's SVD merges compute each layer's delta weights, merge them and factor the result;
    at full rank the factors hold the merge exactly, so their product is our merged change."""
    base, adapters = two_adapters()
    peft_model = peft_with(base, adapters)
    full_rank = 64  # above every layer's smaller dimension: the SVD keeps everything
    peft_model.add_weighted_adapter(
        ["first", "second"],
        [0.7, 1.0],
        "merged",
        combination,
        svd_rank=full_rank,
        svd_full_matrices=False,
        density=0.3,
    )
    ours = merge_task_vectors([lora_task_vector(adapter, 8 / 4) for adapter in adapters], merge)
    for name, change in ours.items():
        layer = peft_model.base_model.model.get_submodule(name.removesuffix(".weight"))
        theirs = layer.lora_B["merged"].weight @ layer.lora_A["merged"].weight * layer.scaling["merged"]
        torch.testing.assert_close(change, theirs, atol=1e-5, rtol=0)


def test_peft_linear_merge_of_lora_factors_is_not_task_arithmetic():
    """PEFT's "linear" merges the A's and the B's apart; their product has cross terms
    (B_a A_b and B_b A_a), so it is not the sum of the two delta weights. Its "cat" is."""
    base, adapters = two_adapters()
    peft_model = peft_with(base, adapters)
    peft_model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "linear", "linear")
    peft_model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "cat", "cat")
    exact = merge_task_vectors(
        [lora_task_vector(a, 8 / 4) for a in adapters], lambda t: task_arithmetic(t, [1, 1])
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    layer = peft_model.base_model.model.get_submodule(name.removesuffix(".weight"))
    products = {
        m: layer.lora_B[m].weight @ layer.lora_A[m].weight * layer.scaling[m] for m in ("linear", "cat")
    }
    torch.testing.assert_close(products["cat"], exact[name], atol=1e-5, rtol=0)
    # "linear": each adapter's A and B scaled by the root of weight times scale, then summed;
    # the merged adapter's own scale is 1, so its change is the product of the two sums.
    root = (1.0 * 8 / 4) ** 0.5
    a, b = (
        {k: v for k, v in adapter.items() if k.startswith(name.removesuffix("weight"))}
        for adapter in adapters
    )
    prefix = name.removesuffix("weight")
    summed_b = root * (a[prefix + "lora_B.weight"] + b[prefix + "lora_B.weight"])
    summed_a = root * (a[prefix + "lora_A.weight"] + b[prefix + "lora_A.weight"])
    torch.testing.assert_close(products["linear"], summed_b @ summed_a, atol=1e-5, rtol=0)
    assert (products["linear"] - exact[name]).abs().max() > 0.1  # the cross terms


def test_a_merged_model_computes_what_the_adapter_did():
    base, adapters = two_adapters()
    torch.manual_seed(0)
    with_adapter = add_lora(copy.deepcopy(base), "all-linear", r=4, lora_alpha=8)
    with_adapter.load_state_dict(adapters[0], strict=False)
    merged = merged_model(base, lora_task_vector(adapters[0], 8 / 4))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=0)
        assert torch.equal(base(ids).logits, random_llama()(ids).logits)  # the base is left as it was


def test_wrong_inputs_are_refused():
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        lora_task_vector({"model.layers.0.weight": torch.zeros(2, 2)}, 1.0)
    with pytest.raises(ValueError, match="change different weights"):
        merge_task_vectors([{"a.weight": torch.zeros(1)}, {"b.weight": torch.zeros(1)}], sum)
    with pytest.raises(ValueError, match="unknown sign election"):
        elect_sign(torch.zeros(2, 3), "majority")
