"""Our IA3 against PEFT's (IA3Config): the same outputs from the same vectors, the same vectors
after the same training steps, an adapter saved by PEFT that loads into ours, merging that
changes no output, and the paper's definition checked on its own."""

import copy

import pytest
import torch
from peft import IA3Config, get_peft_model
from safetensors.torch import load_file

from fieldguide.lab.training import TrainConfig, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.ia3 import (
    IA3Linear,
    add_ia3,
    ia3_layers,
    ia3_state_dict,
    main,
    merge_and_unload,
)
from lab_factories import adamw_steps, random_llama, random_qwen2

# target modules, feedforward modules
CASES = [
    (["k_proj", "v_proj", "down_proj"], ["down_proj"]),  # PEFT's default for Llama
    (["q_proj", "o_proj"], []),
    (["up_proj", "gate_proj", "down_proj", "v_proj"], ["up_proj", "gate_proj", "down_proj"]),
]
IDS = ["peft-default", "outputs-only", "inputs-and-outputs"]


def from_peft(adapter: dict) -> dict:
    """PEFT's names (``base_model.model.<name>.ia3_l[.default]``) as ours (``<name>.ia3_l``)."""
    return {name.removeprefix("base_model.model.").replace(".default", ""): t for name, t in adapter.items()}


def pair(targets, feedforward, base=None, seed=1):
    """PEFT's IA3 model and ours on copies of one base, with the same vectors, moved off their
    starting ones (which would make every layer the base layer)."""
    base = random_llama() if base is None else base
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward)
    theirs = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    for name, p in theirs.named_parameters():
        if "ia3_l" in name:
            p.data += 0.3 * torch.randn(p.shape, generator=generator)
    ours = add_ia3(copy.deepcopy(base), targets, feedforward)
    adapter = from_peft({n: p.detach() for n, p in theirs.named_parameters() if "ia3_l" in n})
    assert adapter.keys() == ia3_state_dict(ours).keys()
    ours.load_state_dict(adapter, strict=False)
    return theirs, ours


def token_batch(seed: int = 0) -> torch.Tensor:  # (3, 10) token ids
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("targets", "feedforward"), CASES, ids=IDS)
def test_same_vectors_give_the_same_logits(targets, feedforward):
    theirs, ours = pair(targets, feedforward)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(token_batch()).logits, theirs(token_batch()).logits, atol=1e-5, rtol=0
        )


def test_a_base_with_biases_gives_the_same_logits():
    """Qwen2's key and value projections have biases: an output's scale covers its bias."""
    theirs, ours = pair(["k_proj", "v_proj", "down_proj"], ["down_proj"], base=random_qwen2())
    with torch.no_grad():
        torch.testing.assert_close(
            ours(token_batch()).logits, theirs(token_batch()).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(("targets", "feedforward"), CASES, ids=IDS)
def test_trainable_parameters_match_peft_and_the_formula(targets, feedforward):
    theirs, ours = pair(targets, feedforward)
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    formula = sum(
        layer.base_layer.in_features if layer.is_feedforward else layer.base_layer.out_features
        for layer in ia3_layers(ours)
    )
    assert count == formula


@pytest.mark.parametrize(("targets", "feedforward"), CASES, ids=IDS)
def test_same_training_steps_give_the_same_vectors(targets, feedforward):
    theirs, ours = pair(targets, feedforward)
    start = {name: tensor.clone() for name, tensor in ia3_state_dict(ours).items()}
    ids = token_batch()
    for model in (theirs, ours):
        adamw_steps(model, ids)
    mine = ia3_state_dict(ours)
    peft = from_peft({n: p.detach() for n, p in theirs.named_parameters() if "ia3_l" in n})
    assert max((mine[name] - peft[name]).abs().max() for name in mine) < 1e-4
    assert min((mine[name] - start[name]).abs().max() for name in mine) > 1e-3  # every vector moved


def test_the_layer_is_the_papers_definition():
    """Liu et al.: l * (W x + b) for keys and values; W (l * x) + b for the feed-forward's
    down projection, whose input is the feed-forward's hidden activation."""
    base = torch.nn.Linear(6, 4)
    x = torch.randn(2, 6)
    output_layer, input_layer = (
        IA3Linear(copy.deepcopy(base)),
        IA3Linear(copy.deepcopy(base), is_feedforward=True),
    )
    output_layer.ia3_l.data = torch.rand(4, 1)
    input_layer.ia3_l.data = torch.rand(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(output_layer(x), output_layer.ia3_l.T * (x @ base.weight.T + base.bias))
        torch.testing.assert_close(input_layer(x), (input_layer.ia3_l * x) @ base.weight.T + base.bias)


def test_a_bfloat16_base_keeps_float32_vectors_and_matches_peft():
    """The real-model path: a bfloat16 base, float32 vectors, outputs cast back to bfloat16."""
    theirs, ours = pair(*CASES[0], base=random_llama().to(torch.bfloat16))
    assert {p.dtype for name, p in ours.named_parameters() if p.requires_grad} == {torch.float32}
    with torch.no_grad():
        logits = ours(token_batch()).logits
        assert logits.dtype == torch.bfloat16
        assert torch.equal(logits, theirs(token_batch()).logits)


def test_all_linear_layers_with_a_feedforward_one():
    model = add_ia3(random_llama(), "all-linear", ["down_proj"])
    assert {type(layer.base_layer).__name__ for layer in ia3_layers(model)} == {"Linear"}
    assert sorted({layer.is_feedforward for layer in ia3_layers(model)}) == [False, True]
    assert len(ia3_layers(model)) == 2 * 7  # two blocks of seven linear layers, the output layer left out


def test_a_fresh_adapter_leaves_the_model_unchanged():
    base = random_llama()
    with torch.no_grad():
        assert torch.equal(add_ia3(copy.deepcopy(base))(token_batch()).logits, base(token_batch()).logits)


@pytest.mark.parametrize(("targets", "feedforward"), CASES, ids=IDS)
def test_merging_changes_no_output_and_unmerging_restores_the_weights(targets, feedforward):
    _, ours = pair(targets, feedforward, base=random_qwen2())
    before = {name: t.clone() for name, t in ours.state_dict().items()}
    with torch.no_grad():
        expected = ours(token_batch()).logits
        for layer in ia3_layers(ours):
            layer.merge()
        torch.testing.assert_close(ours(token_batch()).logits, expected, atol=1e-5, rtol=0)
        for layer in ia3_layers(ours):
            layer.unmerge()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=1e-6)


def test_merge_and_unload_matches_peft():
    theirs, ours = pair(*CASES[0], base=random_qwen2())
    with torch.no_grad():
        merged_theirs = theirs.merge_and_unload()(token_batch()).logits
        plain = merge_and_unload(ours)
        assert not ia3_layers(plain)
        torch.testing.assert_close(plain(token_batch()).logits, merged_theirs, atol=1e-5, rtol=0)


def test_an_adapter_saved_by_peft_loads_into_ours(tmp_path):
    theirs, _ = pair(*CASES[0])
    theirs.save_pretrained(tmp_path)
    saved = from_peft(load_file(tmp_path / "adapter_model.safetensors"))
    ours = add_ia3(random_llama())
    result = ours.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys).isdisjoint(saved)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(token_batch()).logits, theirs(token_batch()).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_every_vector_trains_and_no_base_weight_moves(checkpointing):
    model = add_ia3(random_llama())
    if checkpointing:
        enable_gradient_checkpointing(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": ids, "labels": ids} for ids in token_batch().tolist()] * 2
    train(model, data, TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name


def test_wrong_settings_are_refused():
    with pytest.raises(ValueError, match=r"feedforward_modules \['up_proj'\] must also be in target_modules"):
        add_ia3(random_llama(), ["k_proj"], ["up_proj"])
    with pytest.raises(ValueError, match="no linear layer is named"):
        add_ia3(random_llama(), ["key_proj"], [])
    layer = IA3Linear(torch.nn.Linear(4, 3))
    layer.merge()
    with pytest.raises(RuntimeError, match="merged already"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.ia3_l.data[0] = 0.0
    layer.merge()
    with pytest.raises(ValueError, match="is 0"):
        layer.unmerge()


def test_the_command_line_trains_and_saves_a_plain_model(tmp_path, capsys):
    output = tmp_path / "ia3-model"
    main(["--max-steps", "2", "--batch-size", "4", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and f"saved to {output}" in printed
    assert (output / "model.safetensors").exists()
