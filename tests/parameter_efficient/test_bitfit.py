"""Our bias terms against PEFT's (BeftConfig): the same outputs from the same vectors, the same
vectors after the same training steps, an adapter saved by PEFT that loads into ours, merging
that changes no output; and BitFit as its paper defines it (only the biases train), checked on
its own, with the proof that adding a zero-started vector to a bias is the same training."""

import copy

import pytest
import torch
from peft import BeftConfig, get_peft_model
from safetensors.torch import load_file

from fieldguide.lab.loading import load_model, save_model
from fieldguide.lab.training import TrainConfig, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.bitfit import (
    BiasTerm,
    add_bias_terms,
    as_qwen2,
    bias_state_dict,
    can_declare_biases,
    layers_with_bias,
    main,
    merge_and_unload,
    train_biases,
)
from lab_factories import adamw_steps, random_llama, random_qwen2

# target modules, base model
CASES = [
    (None, random_llama),  # PEFT's default for Llama (the value projection), the BEFT paper's choice
    (["q_proj", "k_proj", "v_proj"], random_qwen2),  # the layers where Qwen2 has its own biases
    ("all-linear", random_llama),
    (["o_proj", "down_proj", "gate_proj"], random_qwen2),  # Qwen2 layers without a bias
]
IDS = ["v-llama", "qkv-qwen2", "all-linear-llama", "no-bias-layers-qwen2"]


def from_peft(adapter: dict) -> dict:
    """PEFT's names (``base_model.model.<name>.beft_bias[.default]``) as ours (``<name>.beft_bias``)."""
    return {name.removeprefix("base_model.model.").replace(".default", ""): t for name, t in adapter.items()}


def peft_vectors(model) -> dict:
    return from_peft({n: p.detach() for n, p in model.named_parameters() if "beft_bias" in n})


def pair(targets, base, seed=1):
    """PEFT's BEFT model and ours on copies of one base, with the same vectors, moved off their
    starting zeros (which would make every layer the base layer)."""
    theirs = get_peft_model(copy.deepcopy(base), BeftConfig(target_modules=targets))
    targets = targets or ["v_proj"]  # what PEFT's default is for a Llama
    generator = torch.Generator().manual_seed(seed)
    for name, p in theirs.named_parameters():
        if "beft_bias" in name:
            p.data += 0.3 * torch.randn(p.shape, generator=generator)
    ours = add_bias_terms(copy.deepcopy(base), targets)
    adapter = peft_vectors(theirs)
    assert adapter.keys() == bias_state_dict(ours).keys()
    ours.load_state_dict(adapter, strict=False)
    return theirs, ours


def token_batch(seed: int = 0) -> torch.Tensor:  # (3, 10) token ids
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(seed))


def bias_layers(model) -> list[BiasTerm]:
    return [module for module in model.modules() if isinstance(module, BiasTerm)]


@pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias")
@pytest.mark.parametrize(("targets", "factory"), CASES, ids=IDS)
def test_same_vectors_give_the_same_logits(targets, factory):
    theirs, ours = pair(targets, factory())
    with torch.no_grad():
        torch.testing.assert_close(
            ours(token_batch()).logits, theirs(token_batch()).logits, atol=1e-5, rtol=0
        )


@pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias")
@pytest.mark.parametrize(("targets", "factory"), CASES, ids=IDS)
def test_trainable_parameters_match_peft_and_the_formula(targets, factory):
    theirs, ours = pair(targets, factory())
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count == sum(layer.base_layer.out_features for layer in bias_layers(ours))  # one per output


@pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias")
@pytest.mark.parametrize(("targets", "factory"), CASES, ids=IDS)
def test_same_training_steps_give_the_same_vectors(targets, factory):
    theirs, ours = pair(targets, factory())
    start = {name: tensor.clone() for name, tensor in bias_state_dict(ours).items()}
    for model in (theirs, ours):
        adamw_steps(model, token_batch())
    mine, peft = bias_state_dict(ours), peft_vectors(theirs)
    assert max((mine[name] - peft[name]).abs().max() for name in mine) < 1e-4
    assert min((mine[name] - start[name]).abs().max() for name in mine) > 1e-3  # every vector moved


def test_the_layer_adds_the_vector_to_the_output():
    """Equation (eq-bitfit): W x + b + beft_bias, and W x + beft_bias for a layer without a bias."""
    x = torch.randn(2, 6)
    for base in (torch.nn.Linear(6, 4), torch.nn.Linear(6, 4, bias=False)):
        layer = BiasTerm(copy.deepcopy(base))
        layer.beft_bias.data = torch.randn(1, 4)
        own = base.bias if base.bias is not None else torch.zeros(4)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ base.weight.T + own + layer.beft_bias.flatten())


def test_adding_a_vector_to_a_bias_trains_as_the_bias_itself():
    """BitFit proper (train Qwen2's own biases) and bias terms on the same layers (train a
    vector added to the frozen biases) are the same training: the vector is the change."""
    base = random_qwen2()
    with torch.no_grad():  # biases of a pretrained size, not the initialisation's zeros
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    own = train_biases(copy.deepcopy(base))
    added = add_bias_terms(copy.deepcopy(base), layers_with_bias(base))
    for model in (own, added):
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0
        )
        for _ in range(5):
            model(token_batch(), labels=token_batch()).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    # Within 1e-4, the parity tests' bound after training steps: the sums round in another
    # order, and Adam divides by the root of tiny squared gradients, which magnifies that.
    trained = bias_state_dict(own)
    assert trained.keys() == {n for n, p in base.named_parameters() if n.endswith(".bias")}
    for name, bias in trained.items():
        layer = added.get_submodule(name.removesuffix(".bias"))
        torch.testing.assert_close(bias, layer.base_layer.bias + layer.beft_bias.flatten(), atol=1e-4, rtol=0)
        assert (bias - base.get_parameter(name)).abs().max() > 1e-2  # far beyond the bound: it trained


def test_weight_decay_tells_the_two_apart():
    """AdamW's decay pulls a trained bias towards 0, and an added vector towards the pretrained
    bias: with decay on, the two trainings part (the pitfall on the page)."""
    base = random_qwen2()
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith(".bias"):
                p.fill_(1.0)
    own = train_biases(copy.deepcopy(base))
    added = add_bias_terms(copy.deepcopy(base), layers_with_bias(base))
    config = TrainConfig(max_steps=5, batch_size=3, learning_rate=1e-2, weight_decay=0.5, progress=False)
    data = [{"input_ids": ids, "labels": ids} for ids in token_batch().tolist()]
    for model in (own, added):
        train(model, data, config)
    name = "model.layers.0.self_attn.q_proj"
    layer = added.get_submodule(name)
    gap = (
        (own.get_parameter(f"{name}.bias") - (layer.base_layer.bias + layer.beft_bias.flatten())).abs().max()
    )
    assert gap > 1e-3


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
@pytest.mark.parametrize("method", ["train_biases", "add_bias_terms"])
def test_only_the_biases_train(method, checkpointing):
    """The paper's definition: every weight frozen, every bias trained; with checkpointing too."""
    if method == "train_biases":
        model = train_biases(random_qwen2())
        expected = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    else:
        model = add_bias_terms(random_llama())
        expected = {n for n, _ in model.named_parameters() if n.endswith(".beft_bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    if checkpointing:
        enable_gradient_checkpointing(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": ids, "labels": ids} for ids in token_batch().tolist()] * 2
    train(model, data, TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == (name in expected), name


def test_a_bfloat16_base_keeps_float32_vectors_and_matches_peft():
    """The real-model path: a bfloat16 base, float32 vectors, outputs cast back to bfloat16."""
    theirs, ours = pair(["q_proj", "k_proj", "v_proj"], random_qwen2().to(torch.bfloat16))
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    with torch.no_grad():
        logits = ours(token_batch()).logits
        assert logits.dtype == torch.bfloat16
        assert torch.equal(logits, theirs(token_batch()).logits)


def test_merging_changes_no_output_and_unmerging_restores_the_weights():
    _, ours = pair(["q_proj", "k_proj", "v_proj"], random_qwen2())
    before = {name: t.clone() for name, t in ours.state_dict().items()}
    with torch.no_grad():
        expected = ours(token_batch()).logits
        for layer in bias_layers(ours):
            layer.merge()
        torch.testing.assert_close(ours(token_batch()).logits, expected, atol=1e-5, rtol=0)
        for layer in bias_layers(ours):
            layer.unmerge()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, before[name], atol=1e-6, rtol=0)


def test_merge_and_unload_matches_peft():
    theirs, ours = pair(["q_proj", "k_proj", "v_proj"], random_qwen2())
    with torch.no_grad():
        merged_theirs = theirs.merge_and_unload()(token_batch()).logits
        plain = merge_and_unload(ours)
        assert not bias_layers(plain)
        torch.testing.assert_close(plain(token_batch()).logits, merged_theirs, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Detected that the base layer has no bias")
def test_an_adapter_saved_by_peft_loads_into_ours(tmp_path):
    theirs, _ = pair(["v_proj"], random_llama())
    theirs.save_pretrained(tmp_path)
    saved = from_peft(load_file(tmp_path / "adapter_model.safetensors"))
    ours = add_bias_terms(random_llama(), ["v_proj"])
    result = ours.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys).isdisjoint(saved)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(token_batch()).logits, theirs(token_batch()).logits, atol=1e-5, rtol=0
        )


def test_the_tiny_model_dressed_as_qwen2_computes_what_it_did():
    llama = random_llama()
    qwen2 = as_qwen2(llama)
    assert type(qwen2).__name__ == "Qwen2ForCausalLM"
    assert layers_with_bias(llama) == [] and layers_with_bias(qwen2) == ["k_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(
            qwen2(token_batch()).logits, llama(token_batch()).logits, atol=1e-6, rtol=0
        )


def test_wrong_settings_are_refused():
    with pytest.raises(ValueError, match="takes a Llama without biases, not a 'qwen2' model"):
        as_qwen2(random_qwen2())
    with pytest.raises(ValueError, match="no bias terms to train"):
        train_biases(random_llama())
    with pytest.raises(ValueError, match="needs float32 biases"):
        train_biases(random_qwen2().to(torch.bfloat16))
    with pytest.raises(ValueError, match="no linear layer is named"):
        add_bias_terms(random_llama(), ["value_proj"])
    with pytest.raises(ValueError, match="no bias to merge into"):
        BiasTerm(torch.nn.Linear(4, 3, bias=False)).merge()
    layer = BiasTerm(torch.nn.Linear(4, 3))
    layer.merge()
    with pytest.raises(RuntimeError, match="merged already"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_the_command_line_adds_biases_to_a_llama(capsys):
    main(["--max-steps", "2", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert "added to every linear layer" in printed and "trainable parameters   2,400 of" in printed


def test_the_command_line_refuses_own_biases_on_a_llama(capsys):
    with pytest.raises(SystemExit):
        main(["--max-steps", "2", "--biases", "own"])
    assert "this model has no biases" in capsys.readouterr().err


def test_a_llama_merges_biases_on_every_projection_and_loads_back_as_a_llama(tmp_path, capsys):
    """transformers' Llama declares biases with attention_bias and mlp_bias: the merged
    all-linear model saves, loads with its own code, and computes what the trained one did."""
    output = tmp_path / "merged"
    main(["--max-steps", "2", "--batch-size", "4", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "added to every linear layer" in printed and f"saved to {output}" in printed
    merged, _ = load_model(str(output))
    assert merged.config.attention_bias and merged.config.mlp_bias
    assert layers_with_bias(merged) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert any(p.abs().max() > 0 for n, p in merged.named_parameters() if n.endswith(".bias"))


def test_merge_and_unload_of_a_llama_matches_the_unmerged_model():
    model = add_bias_terms(random_llama(), "all-linear")
    with torch.no_grad():
        for layer in bias_layers(model):
            layer.beft_bias.normal_()
        expected = model(token_batch()).logits
        plain = merge_and_unload(model)
        assert not bias_layers(plain) and plain.config.attention_bias and plain.config.mlp_bias
        torch.testing.assert_close(plain(token_batch()).logits, expected, atol=1e-5, rtol=0)


def test_a_llama_with_value_biases_alone_merges_and_loads_back(tmp_path):
    """PEFT's default, the value projection alone: the attention switch declares biases on all
    four attention projections (three stay at zero), none on the feed-forward network's."""
    model = add_bias_terms(random_llama(), ["v_proj"])
    with torch.no_grad():
        for layer in bias_layers(model):
            layer.beft_bias.normal_()
        expected = model(token_batch()).logits
    plain = merge_and_unload(model)
    assert plain.config.attention_bias and not plain.config.mlp_bias
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path)
    assert layers_with_bias(reloaded) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(token_batch()).logits, expected, atol=1e-5, rtol=0)


def test_which_models_can_declare_biases():
    assert can_declare_biases(random_llama(), ["q_proj", "v_proj"])
    assert can_declare_biases(random_llama(), "all-linear")
    assert can_declare_biases(random_qwen2(), ["q_proj", "k_proj", "v_proj"])
    assert not can_declare_biases(random_qwen2(), "all-linear")  # Qwen2 has no switch for the rest
    with pytest.raises(ValueError, match="only a Llama's projections can declare biases"):
        merge_and_unload(add_bias_terms(random_qwen2(), ["o_proj"]))


def test_merging_into_a_bfloat16_bias_rounds_the_sum():
    """The pitfall on the page: merged into 16 bits, the trained change is rounded with the bias."""
    base_layer = torch.nn.Linear(4, 3).to(torch.bfloat16)
    with torch.no_grad():
        base_layer.bias.fill_(20.0)
    layer = BiasTerm(base_layer)
    with torch.no_grad():
        layer.beft_bias.fill_(0.05)
    layer.merge()
    assert layer.base_layer.bias.dtype == torch.bfloat16
    assert layer.base_layer.bias.tolist() == [20.0, 20.0, 20.0]  # 0.05 is below half a bfloat16 step at 20


def test_the_command_line_trains_a_qwen2s_own_biases_and_saves_them_merged(tmp_path, capsys):
    llama, tokenizer = load_model("tiny")
    save_model(as_qwen2(llama), tokenizer, tmp_path / "qwen2")
    output = tmp_path / "merged"
    main(
        ["--model", str(tmp_path / "qwen2"), "--max-steps", "2", "--batch-size", "4", "--output", str(output)]
    )
    printed = capsys.readouterr().out
    assert "the model's own, on k_proj, q_proj, v_proj" in printed and f"saved to {output}" in printed
    merged, _ = load_model(str(output))
    assert layers_with_bias(merged) == ["k_proj", "q_proj", "v_proj"]
    assert any(p.abs().max() > 0 for n, p in merged.named_parameters() if n.endswith(".bias"))
