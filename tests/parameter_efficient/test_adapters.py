"""Our bottleneck adapters against Houlsby et al.'s definition (PEFT has none to compare with):
the adapter computes h + W_up f(W_down h + b_down) + b_up on the sublayer's output, sits where
the paper puts it, starts as the identity, trains with the normalisation gains and nothing else,
and its count is the paper's 2md + d + m per adapter; what is saved loads back onto the same base,
and a file that does not fit it is refused."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from fieldguide.lab.loading import load_model
from fieldguide.lab.training import TrainConfig, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.adapters import (
    ADAPTER_FILE,
    BottleneckAdapter,
    adapter_state_dict,
    add_adapters,
    load_adapters,
    main,
    norm_names,
    save_adapters,
)
from lab_factories import random_llama, random_qwen2


def token_batch(seed: int = 0) -> torch.Tensor:  # (3, 10) token ids
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(seed))


def moved(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every adapter's up-projection moved off its starting zeros, so that every path counts."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "adapter_up" in name:
            p.data += 0.1 * torch.randn(p.shape, generator=generator)
    return model


@pytest.mark.parametrize("base", [random_llama, random_qwen2], ids=["llama", "qwen2"])
def test_a_fresh_adapter_leaves_the_model_unchanged(base):
    model = base()
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(add_adapters(model, 4)(ids).logits, expected)


def test_the_adapter_is_the_papers_definition():
    torch.manual_seed(0)
    layer = BottleneckAdapter(torch.nn.Linear(6, 5), bottleneck_size=3)
    moved(layer)
    x = torch.randn(4, 6)
    h = x @ layer.base_layer.weight.T + layer.base_layer.bias
    inner = torch.relu(h @ layer.adapter_down.weight.T + layer.adapter_down.bias)
    expected = h + inner @ layer.adapter_up.weight.T + layer.adapter_up.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_an_adapter_reads_each_sublayers_output_before_the_residual_adds_it():
    """Twice per block, on attention's and the feed-forward network's own outputs."""
    model = moved(add_adapters(random_llama(), 4))
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
    assert sorted(adapters) == [
        f"model.layers.{i}.{part}" for i in range(2) for part in ("mlp.down_proj", "self_attn.o_proj")
    ]
    seen = []
    for adapter in adapters.values():  # what reaches the adapter must be its base layer's output
        adapter.base_layer.register_forward_hook(lambda m, args, out: seen.append(("base", out)))
        adapter.adapter_down.register_forward_hook(lambda m, args, out: seen.append(("down", args[0])))
    with torch.no_grad():
        model(token_batch())
    assert len(seen) == 8
    for (first, base_out), (second, down_in) in zip(seen[::2], seen[1::2], strict=True):
        assert (first, second) == ("base", "down") and torch.equal(base_out, down_in)


@pytest.mark.parametrize("base", [random_llama, random_qwen2], ids=["llama", "qwen2"])
def test_the_residual_stream_adds_the_adapters_output(base):
    """What a block adds to its residual stream is h' itself: the adapter sits before the addition."""
    model = moved(add_adapters(base(), 4))
    block = model.model.layers[0]
    seen = {}
    block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(x=kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    block.self_attn.o_proj.register_forward_hook(lambda m, args, out: seen.update(attention=out))
    block.post_attention_layernorm.register_forward_pre_hook(lambda m, args: seen.update(mid=args[0]))
    block.mlp.down_proj.register_forward_hook(lambda m, args, out: seen.update(mlp=out))
    block.register_forward_hook(
        lambda m, args, out: seen.update(out=out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        model(token_batch())
    torch.testing.assert_close(seen["mid"], seen["x"] + seen["attention"], atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["out"], seen["mid"] + seen["mlp"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bottleneck_size", [1, 4, 16])
@pytest.mark.parametrize("train_norms", [True, False], ids=["with-norms", "adapters-only"])
def test_the_count_is_the_papers_formula(bottleneck_size, train_norms):
    model = random_llama()
    config = model.config
    d, m, blocks = config.hidden_size, bottleneck_size, config.num_hidden_layers
    add_adapters(model, m, train_norms=train_norms)
    per_adapter = 2 * m * d + d + m  # Houlsby et al.: 2md + d + m, biases included
    gains = (2 * blocks + 1) * d if train_norms else 0  # two RMSNorms a block, and the final one
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * blocks * per_adapter + gains
    assert sum(t.numel() for t in adapter_state_dict(model).values()) == trainable


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_adapters_and_gains_train_and_no_other_weight_moves(checkpointing):
    model = add_adapters(random_llama(), 4)
    if checkpointing:
        enable_gradient_checkpointing(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": ids, "labels": ids} for ids in token_batch().tolist()] * 2
    train(model, data, TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, progress=False))
    gains = set(norm_names(model))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == ("adapter_" in name or name in gains), name


def test_a_bfloat16_base_keeps_float32_adapters_and_refuses_16_bit_gains():
    base = random_llama().to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 normalisation gains"):
        add_adapters(copy.deepcopy(base), 4)
    model = moved(add_adapters(base, 4, train_norms=False))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ids = token_batch()
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_wrong_settings_are_refused():
    with pytest.raises(ValueError, match="no linear layer is named"):
        add_adapters(random_llama(), 4, target_modules=["out_proj"])


def trained_adapters(bottleneck_size: int = 4, **shape) -> torch.nn.Module:
    """Adapters on a random Llama, moved off their start, with the gains moved too."""
    model = moved(add_adapters(random_llama(**shape), bottleneck_size))
    for name in norm_names(model):
        model.get_parameter(name).data += 0.1
    return model


def test_saved_adapters_load_onto_a_fresh_base_and_answer_the_same(tmp_path):
    model = trained_adapters()
    save_adapters(model, tmp_path, 4, None)
    loaded = load_adapters(random_llama(), tmp_path)  # the same base weights, seeded alike
    ids = token_batch()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # ready to answer, not to train


def test_adapters_saved_from_another_model_are_refused(tmp_path):
    save_adapters(trained_adapters(), tmp_path, 4, None)
    with pytest.raises(ValueError, match="has shape"):
        load_adapters(random_llama(hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match="no place for"):
        load_adapters(random_llama(num_hidden_layers=1), tmp_path)


def test_a_refused_file_leaves_the_base_as_it_was(tmp_path):
    save_adapters(trained_adapters(), tmp_path, 4, None)
    base = random_llama(hidden_size=48)
    base.model.norm.weight.requires_grad_(False)  # a flag of the caller's own, to be kept
    before = {name: (p.requires_grad, p.detach().clone()) for name, p in base.named_parameters()}
    with pytest.raises(ValueError):
        load_adapters(base, tmp_path)
    assert not any(isinstance(m, BottleneckAdapter) for m in base.modules())
    after = dict(base.named_parameters())
    assert list(after) == list(before)
    for name, (requires_grad, value) in before.items():
        assert after[name].requires_grad == requires_grad and torch.equal(after[name], value), name


def test_adapters_trained_on_another_named_base_load_with_a_warning(tmp_path):
    model = trained_adapters()
    save_adapters(model, tmp_path, 4, "Qwen/Qwen2.5-0.5B")
    base = random_llama()
    base.config.name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.warns(UserWarning, match="trained on 'Qwen/Qwen2.5-0.5B'"):
        load_adapters(base, tmp_path)
    base = random_llama()
    base.config.name_or_path = "Qwen/Qwen2.5-0.5B"
    load_adapters(base, tmp_path)  # the same name: no warning (pytest turns warnings into errors)


def test_a_file_missing_adapters_is_refused(tmp_path):
    save_adapters(trained_adapters(), tmp_path, 4, None)
    tensors = load_file(tmp_path / ADAPTER_FILE)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp" not in k}, tmp_path / ADAPTER_FILE)
    with pytest.raises(ValueError, match="lacks"):
        load_adapters(random_llama(), tmp_path)


def test_the_command_line_trains_and_saves_what_loads_back(tmp_path, capsys):
    output = tmp_path / "adapters"
    main(["--max-steps", "2", "--batch-size", "4", "--bottleneck-size", "2", "--output", str(output)])
    assert "trainable parameters" in capsys.readouterr().out
    model = load_adapters(load_model("tiny")[0], output)
    assert (
        sum(isinstance(m, BottleneckAdapter) for m in model.modules()) == 2 * model.config.num_hidden_layers
    )
    assert (output / "tokenizer.json").is_file()
    with pytest.raises(SystemExit):
        main(["--bottleneck-size", "0"])
    assert "--bottleneck-size" in capsys.readouterr().err
