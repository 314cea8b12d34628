"""Our QLoRA against bitsandbytes and PEFT: the NF4 table, the quantized blocks and the
dequantized weights equal bitsandbytes' own to the last bit; a tiny model quantized by
transformers' 4-bit loading and adapted by PEFT gives our logits and, after the same steps,
our adapter; and the layer's own promises (nothing full-size kept for the backward pass, the
stated bits per weight, a merge that goes through a dequantized copy) hold."""

import copy
import gc
import weakref

import bitsandbytes.functional as bnb
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.backends.default import ops as default_ops
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fieldguide.lab.loading import load_model
from fieldguide.lab.training import TrainConfig, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.lora import (
    from_peft_state_dict,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
)
from fieldguide.parameter_efficient.qlora import (
    Linear4bit,
    add_qlora,
    dequantize_blockwise,
    dequantize_linears,
    dynamic_code,
    main,
    nf4_code,
    pack,
    quantize_blockwise,
    quantize_frozen_linears,
    quantized_bytes,
    storage_bits_per_weight,
)
from lab_factories import adamw_steps, random_llama, random_qwen2


def linear(weight: torch.Tensor, bias: bool = False) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    return layer


def normal_weight(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return (0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


def test_the_code_tables_are_bitsandbytes_own():
    assert torch.equal(nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map())


# shape, blocksize, dtype: whole blocks, a short last block with an odd count, 16-bit inputs
SHAPES = [
    ((64, 128), 64, torch.float32),
    ((96, 200), 64, torch.float32),
    ((3, 63), 64, torch.float32),
    ((128, 256), 128, torch.bfloat16),
    ((37, 64), 64, torch.float16),
]


@pytest.mark.parametrize(("shape", "blocksize", "dtype"), SHAPES, ids=str)
def test_quantized_blocks_and_dequantized_weights_equal_bitsandbytes(shape, blocksize, dtype):
    weight = normal_weight(shape, dtype)
    theirs, state = bnb.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4")
    indices, absmax = quantize_blockwise(weight, nf4_code(), blocksize)
    assert torch.equal(pack(indices), theirs.view(-1))
    assert torch.equal(absmax, state.absmax)
    ours = Linear4bit(linear(weight), blocksize, double_quant=False)
    assert torch.equal(ours.dequantize(dtype), bnb.dequantize_4bit(theirs, state))


def test_rows_that_are_not_whole_blocks_follow_bitsandbytes_pytorch_backend():
    """bitsandbytes 0.50's AVX-512 C kernel for CPUs reads the absmax constants row by row, so it
    dequantizes a weight whose rows are not a whole number of blocks differently from its own
    quantizer and from its PyTorch backend, which read the weight as one row of blocks, as ours
    does. (Found while writing these tests; the PEFT tests below use rows of whole blocks.)"""
    weight = normal_weight((16, 32))
    theirs, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    ours = Linear4bit(linear(weight), 64, double_quant=False).dequantize()
    # The backend's function without the torch.compile wrapper it gets where compiling works.
    compiled = default_ops._dequantize_4bit_compute
    pytorch_backend = getattr(compiled, "__wrapped__", compiled)
    expected = pytorch_backend(theirs.view(-1), state.absmax, state.code, 64, (16, 32), torch.float32)
    assert torch.equal(ours, expected)
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):  # where the C kernel runs
        assert not torch.equal(ours, bnb.dequantize_4bit(theirs, state))


def test_every_number_goes_to_the_nearest_code_value():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    for code, blocksize in [(nf4_code(), 64), (dynamic_code(), 256)]:
        indices, absmax = quantize_blockwise(x, code, blocksize)
        scaled = x / absmax.repeat_interleave(blocksize)[: x.numel()]
        distance = (scaled[:, None] - code[None, :]).abs()  # (5000, len(code))
        chosen = distance.gather(1, indices.long()[:, None]).squeeze(1)
        assert torch.all(chosen <= distance.min(dim=1).values + 1e-7)


def test_double_quantization_matches_bitsandbytes():
    """The second level: the same offset and block constants; the same 8-bit indices wherever
    bitsandbytes' CPU kernel picks the nearest value (it misses about one in five hundred, by
    one step, where ours never does); and bitsandbytes' own quantized state, read by our
    layer, gives its dequantized weight to the last bit."""
    weight = normal_weight((640, 512))
    theirs, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = Linear4bit(linear(weight), 64, double_quant=True)
    assert torch.equal(ours.weight, theirs.view(-1))
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.absmax2, state.state2.absmax)
    differ = ours.absmax != state.absmax
    assert differ.sum() <= 0.003 * differ.numel()  # 9 of 5,120 on the machine this was written on
    assert (ours.absmax[differ].long() - state.absmax[differ].long()).abs().max() <= 1
    constants = ours.block_absmax()  # what the 8-bit indices stand for, ours then theirs
    ours.absmax.copy_(state.absmax)
    assert torch.equal(ours.dequantize(), bnb.dequantize_4bit(theirs, state))
    true_absmax = weight.view(-1, 64).abs().amax(dim=1)
    assert (constants - true_absmax).abs().max() <= (ours.block_absmax() - true_absmax).abs().max()


def test_an_all_zero_block_stays_zero():
    weight = normal_weight((4, 64))
    weight[1] = 0
    indices, absmax = quantize_blockwise(weight, nf4_code(), 64)
    rebuilt = dequantize_blockwise(indices, absmax, nf4_code(), 64).view(4, 64)
    assert torch.isfinite(rebuilt).all() and torch.equal(rebuilt[1], torch.zeros(64))


@pytest.mark.parametrize("double_quant", [False, True], ids=["float32-constants", "double-quant"])
def test_the_bytes_held_are_the_pages_bits_per_weight(double_quant):
    n = 1024 * 1024
    layer = Linear4bit(linear(normal_weight((1024, 1024))), 64, double_quant)
    offset_bits = 32 if double_quant else 0  # one float32 mean per layer
    assert quantized_bytes(layer) * 8 == storage_bits_per_weight(64, double_quant) * n + offset_bits


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_the_layer_is_a_linear_layer_with_the_dequantized_weight(bias):
    layer = linear(normal_weight((48, 64)), bias=bias)
    quantized = Linear4bit(layer, 64)
    x = torch.randn(2, 5, 64, requires_grad=True)
    x_copy = x.detach().clone().requires_grad_(True)
    weight = quantized.dequantize()
    expected = F.linear(x_copy, weight, layer.bias)
    torch.testing.assert_close(quantized(x), expected, atol=1e-6, rtol=0)
    quantized(x).square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_copy.grad, atol=1e-5, rtol=0)


def test_the_backward_pass_keeps_no_full_size_weight():
    """Autograd keeps what the backward pass needs; a layer that kept its rebuilt weight would
    hold a 32-bit copy of every layer until the backward, the memory QLoRA exists to save."""
    quantized = Linear4bit(linear(normal_weight((256, 256))), 64)
    x = torch.randn(4, 256, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        quantized(x).sum().backward()
        F.linear(x, quantized.dequantize()).sum().backward()  # the naive way, for contrast
    sizes = [t.numel() for t in kept]
    assert 256 * 256 in sizes  # the naive layer keeps the weight...
    assert sizes.count(256 * 256) == 1  # ... ours never does


def bnb_pair(tmp_path, double_quant: bool = False):
    """transformers' 4-bit loading plus PEFT's LoRA, and our QLoRA, on one random Llama, with
    the same random B in both."""
    base = random_llama(hidden_size=64, intermediate_size=128)  # rows of whole blocks (see the test above)
    base.save_pretrained(tmp_path)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    torch.manual_seed(0)
    theirs = get_peft_model(loaded, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=generator)
    ours = add_qlora(copy.deepcopy(base), r=4, lora_alpha=8, double_quant=double_quant)
    load_adapter(ours, peft_adapter(theirs))
    if double_quant:  # bitsandbytes' 8-bit constants, where its CPU kernel rounds differently
        for name, layer in ours.named_modules():
            if isinstance(layer, Linear4bit):
                state = theirs.get_submodule(f"base_model.model.{name}").weight.quant_state
                layer.absmax.copy_(state.absmax)
    # Training mode in both: bitsandbytes answers an evaluation-mode call on some CPUs with
    # another, repacked kernel.
    return theirs.train(), ours.train()


def peft_adapter(model) -> dict:
    return from_peft_state_dict(
        {
            name.replace(".default", ""): p.detach().clone()
            for name, p in model.named_parameters()
            if "lora_" in name
        }
    )


def token_batch() -> torch.Tensor:  # (3, 10) token ids
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("double_quant", [False, True], ids=["float32-constants", "double-quant"])
def test_the_same_logits_as_peft_over_transformers_4bit_loading(tmp_path, double_quant):
    theirs, ours = bnb_pair(tmp_path, double_quant)
    with torch.no_grad():
        assert torch.equal(ours(token_batch()).logits, theirs(token_batch()).logits)  # to the last bit


@pytest.mark.parametrize("double_quant", [False, True], ids=["float32-constants", "double-quant"])
def test_the_same_adapter_as_peft_after_the_same_training_steps(tmp_path, double_quant):
    theirs, ours = bnb_pair(tmp_path, double_quant)
    start = {name: tensor.clone() for name, tensor in lora_state_dict(ours).items()}
    ids = token_batch()
    for model in (theirs, ours):
        adamw_steps(model, ids)
    mine, peft = lora_state_dict(ours), peft_adapter(theirs)
    assert max((mine[name] - peft[name]).abs().max() for name in mine) < 1e-4
    assert min((mine[name] - start[name]).abs().max() for name in mine) > 1e-3  # every A and B moved


def test_only_frozen_linear_layers_but_the_output_layer_are_quantized():
    model = add_qlora(random_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    linears = {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Linear4bit))
    }
    assert linears["lm_head"] == "Linear"
    assert linears["model.layers.0.self_attn.q_proj.base_layer"] == "Linear4bit"
    assert linears["model.layers.0.self_attn.q_proj.lora_A"] == "Linear"
    assert linears["model.layers.0.mlp.up_proj"] == "Linear4bit"  # frozen, not adapted: quantized too


def test_each_original_layer_is_released_once_quantized(monkeypatch):
    """On a real model the originals are 16-bit layers of hundreds of megabytes: quantizing
    must let each go as soon as its 4-bit form exists, not hold them all to the end."""
    model = random_llama().requires_grad_(False)
    originals = [
        weakref.ref(m) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head
    ]
    alive, quantize = [], Linear4bit.__init__

    def counting(self, linear, *args):
        gc.collect()
        alive.append(sum(ref() is not None for ref in originals))
        quantize(self, linear, *args)

    monkeypatch.setattr(Linear4bit, "__init__", counting)
    quantize_frozen_linears(model)
    assert alive == list(range(len(originals), 0, -1))  # the k-th finds k - 1 gone


def test_a_base_with_biases_keeps_them():
    base = random_qwen2()
    model = quantize_frozen_linears(copy.deepcopy(base).requires_grad_(False))
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.bias, base.model.layers[0].self_attn.q_proj.bias
    )
    with torch.no_grad():
        drift = (model(token_batch()).logits - base(token_batch()).logits).abs().max()
    assert 0 < drift < 0.5  # rounded, not broken


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_every_adapter_weight_trains_and_no_base_weight_moves(checkpointing):
    model = add_qlora(random_llama(), r=4, lora_alpha=8)
    if checkpointing:
        enable_gradient_checkpointing(model)
    before = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    data = [{"input_ids": ids, "labels": ids} for ids in token_batch().tolist()] * 2
    train(model, data, TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_merging_goes_through_a_dequantized_copy():
    model = add_qlora(random_llama(), r=4, lora_alpha=8)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match="dequantized copy"):
        lora_layers(model)[0].merge()
    with torch.no_grad():
        expected = model(token_batch()).logits
        merged = merge_and_unload(dequantize_linears(model))
        assert not any(isinstance(m, Linear4bit) for m in merged.modules())
        torch.testing.assert_close(merged(token_batch()).logits, expected, atol=1e-5, rtol=0)


def test_the_command_line_saves_the_adapter_and_the_merged_model(tmp_path, capsys):
    output = tmp_path / "qlora-model"
    main(["--max-steps", "2", "--batch-size", "4", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "after merging" in printed and f"saved to {output}" in printed
    saved = AutoModelForCausalLM.from_pretrained(output).eval()
    # The saved adapter on a freshly quantized base is the saved merged model.
    base, _ = load_model("tiny")
    adapter = load_file(output / "lora_adapter.safetensors")
    assert max(t.abs().max() for name, t in adapter.items() if "lora_B" in name) > 0  # it trained
    unmerged = load_adapter(add_qlora(base, r=8, lora_alpha=16), adapter)
    with torch.no_grad():
        torch.testing.assert_close(
            saved(token_batch()).logits, unmerged(token_batch()).logits, atol=1e-5, rtol=0
        )
