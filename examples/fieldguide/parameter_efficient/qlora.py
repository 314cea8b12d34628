"""QLoRA from scratch: LoRA trained on top of a base frozen in 4-bit NormalFloat (NF4).

Dettmers et al. (2023) keep the frozen base weights in 4 bits and train LoRA's A and B in
16 or 32 bits on top. A weight is stored as the index (0 to 15) of the nearest of 16 fixed
values, the NF4 code, after its block of 64 weights has been divided by the block's largest
magnitude (its absmax); the absmax constants are themselves quantized to 8 bits (double
quantization). In every forward and backward pass the layer rebuilds its weight from those
indices, uses it and throws it away, so only the 4-bit form stays in memory.

Every function below gives the same numbers as bitsandbytes' ``quantize_4bit`` and
``dequantize_4bit`` (the test suite checks them to the last bit). Run it on the lab's
sentiment task, or on a real model with ``--model``::

    python -m fieldguide.parameter_efficient.qlora --lora-r 8 --lora-alpha 16
"""

import functools
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    add_output_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    training_config,
)
from fieldguide.lab.experiment import Technique, run_on_tiny_model, run_technique
from fieldguide.lab.loading import parse_and_load, save_if_asked
from fieldguide.lab.memory import check_weights_fit
from fieldguide.lab.records import recorded
from fieldguide.lab.stats import score
from fieldguide.parameter_efficient.lora import (
    PRESETS,
    add_lora,
    add_lora_arguments,
    lora_fine_tuning,
    lora_state_dict,
    merge_and_unload,
)

# The outermost probability of NF4's grid: its values are normal quantiles between 1 - 0.9677
# and 0.9677, not out at 0 and 1, where the quantiles are infinite. bitsandbytes' constant,
# which its source says was chosen by experiment.
NF4_OFFSET = 0.9677083


@functools.cache  # one table per device, computed once
def nf4_code(device: str | torch.device = "cpu") -> torch.Tensor:
    """The 16 values of NF4 in increasing order, from -1 to 1: (16,).

    Quantiles of the standard normal distribution at evenly spaced probabilities, so that
    each value stands for about as many normally distributed weights as any other: 8 above
    zero, 7 below, and zero itself, which a weight of exactly 0 (padding, say) needs.
    """
    # The probabilities in float32 and the quantiles in float64, as bitsandbytes computes
    # them: the same table to the last bit.
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # 8 values
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # 7 values
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return (values / values.max()).to(device)


@functools.cache
def dynamic_code(device: str | torch.device = "cpu") -> torch.Tensor:
    """The 256 values of bitsandbytes' 8-bit "dynamic" type, in increasing order: (256,).

    Dettmers (2016) spends a byte as a sign, an exponent of ten (0 to -6) and a fraction
    whose bits are whatever the exponent leaves: small numbers get a coarse grid, numbers near
    1 a fine one, 2**i evenly spaced fractions for exponent i - 6. Double quantization
    stores the absmax constants in this type.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)  # 2**i equal steps of the fraction
        middles = (edges[:-1] + edges[1:]) / 2
        values += (10.0 ** (i - 6) * middles).tolist() + (-(10.0 ** (i - 6)) * middles).tolist()
    return torch.tensor(sorted(values), device=device)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Absmax quantization in blocks: (indices into ``code``, one absmax per block).

    ``x`` is read as one row of numbers cut into blocks of ``blocksize`` (the last may be
    shorter); each block is divided by its largest magnitude, so that it spans at most
    [-1, 1], and every number becomes the index of the nearest value of ``code``.
    """
    flat = x.detach().reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)  # zeros leave absmax alone
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks * (1 / absmax.clamp(min=1e-38))[:, None]  # an all-zero block stays zero
    midpoints = (code[:-1] + code[1:]) / 2  # between two neighbours, the nearer wins
    indices = torch.bucketize(scaled, midpoints).to(torch.uint8)  # (n_blocks, blocksize)
    return indices.view(-1)[: flat.numel()], absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """The numbers back, in float32: each index's code value times its block's absmax."""
    return code[indices.long()] * absmax.repeat_interleave(blocksize)[: indices.numel()]


def pack(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high half, as bitsandbytes stores them."""
    indices = F.pad(indices, (0, indices.numel() % 2), value=7)  # an odd count gets one 0.0 (NF4's 7)
    return indices[0::2] << 4 | indices[1::2]


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:numel]


class _DequantizedMatmul(torch.autograd.Function):
    """``x W^T``, with ``W`` rebuilt from 4 bits in the forward pass and again in the backward.

    Autograd would otherwise keep the rebuilt ``W`` from the forward pass until the backward,
    one full-precision copy of every layer at once: the memory QLoRA exists to save. Since
    ``W`` is frozen, the backward needs ``W`` alone (for the input's gradient), not ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return x @ layer.dequantize(x.dtype).T  # (..., d_out)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.layer.dequantize(grad_output.dtype)  # (d_out, d_in), again
        return (grad_output @ weight).to(ctx.input_dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4, in bitsandbytes' layout.

    ``weight`` holds two 4-bit indices per byte; ``absmax`` one constant per block of
    ``blocksize`` weights, in float32, or, with ``double_quant``, in 8 bits plus one float32
    ``absmax2`` per 256 constants and their mean ``offset``.
    """

    def __init__(
        self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, device=None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        device = device or linear.weight.device  # where the 4-bit form will live
        # A copy of the weight goes to the device to be quantized there; ``linear`` stays put.
        indices, absmax = quantize_blockwise(linear.weight.to(device), nf4_code(device), blocksize)
        self.weight = nn.Parameter(pack(indices), requires_grad=False)  # (d_out * d_in / 2,) uint8
        if double_quant:  # the constants are positive; centred on their mean, they use both signs
            offset = absmax.mean()
            absmax, absmax2 = quantize_blockwise(absmax - offset, dynamic_code(device), 256)
            self.register_buffer("absmax2", absmax2)
            self.register_buffer("offset", offset)
        self.register_buffer("absmax", absmax)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def block_absmax(self) -> torch.Tensor:
        """Each block's constant, in float32 (rebuilt from 8 bits under double quantization)."""
        if not self.double_quant:
            return self.absmax
        return (
            dequantize_blockwise(self.absmax, self.absmax2, dynamic_code(self.absmax.device), 256)
            + self.offset
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the layer uses it: (d_out, d_in), in ``dtype``."""
        numel = self.out_features * self.in_features
        indices = unpack(self.weight, numel)
        code = nf4_code(self.weight.device)
        weight = dequantize_blockwise(indices, self.block_absmax(), code, self.blocksize)
        return weight.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        """``x W^T + b`` with the weight rebuilt from its 4-bit form: (..., d_out)."""
        result = _DequantizedMatmul.apply(x, self)
        return result if self.bias is None else result + self.bias.to(result.dtype)


def quantize_frozen_linears(
    model: nn.Module, blocksize: int = 64, double_quant: bool = True, device=None
) -> nn.Module:
    """Replace every frozen ``nn.Linear`` but the output layer with a ``Linear4bit``.

    As transformers' 4-bit loading does, the output layer stays in 16 or 32 bits; trainable
    layers (LoRA's A and B) are left alone. With ``device``, each layer is quantized there
    from a copy of its weight, and its original dropped, so that a GPU never holds more than
    one layer unquantized and the computer's memory frees the originals one by one.
    """
    output_layer = model.get_output_embeddings()
    names = [  # names, not the modules: a list of modules would keep every original alive
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output_layer and not module.weight.requires_grad
    ]
    for name in names:
        model.set_submodule(name, Linear4bit(model.get_submodule(name), blocksize, double_quant, device))
    return model.to(device) if device else model


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every ``Linear4bit`` back to an ``nn.Linear`` holding its dequantized weight.

    Merging LoRA into a 4-bit base would round the update away to the NF4 grid; it goes into
    this 16- or 32-bit copy of the base instead, the same weights the adapter trained on.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            linear.weight = nn.Parameter(module.dequantize(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.to(dtype), requires_grad=False)
            model.set_submodule(name, linear)
    return model


def add_qlora(model: nn.Module, target_modules="all-linear", blocksize=64, double_quant=True, **options):
    """LoRA layers on ``model`` (``options`` are ``add_lora``'s), then the frozen base in NF4."""
    add_lora(model, target_modules, **options)
    return quantize_frozen_linears(model, blocksize, double_quant)


def storage_bits_per_weight(blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256) -> float:
    """Equation (eq-qlora-bits) of the page: 4 bits per weight plus its share of the constants."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``: what it holds in memory."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def qlora_base_bytes(config, double_quant: bool = True) -> int:
    """The bytes of a base as QLoRA keeps it, for a model built from ``config``: every linear
    layer but the output layer in NF4 (equation (eq-qlora-bits), plus one float32 mean per
    layer), everything else in bfloat16. Built on the meta device, so no memory is used."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    output_layer = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not output_layer]
    quantized = sum(m.weight.numel() for m in linears)
    rest = sum(p.numel() for p in model.parameters()) - quantized  # a tied embedding counts once
    means = 4 * len(linears) if double_quant else 0
    return round(quantized * storage_bits_per_weight(double_quant=double_quant) / 8) + means + 2 * rest


def relative_error(weight: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> float:
    """``||W - Q(W)|| / ||W||`` for blockwise absmax quantization of ``weight`` onto ``code``."""
    indices, absmax = quantize_blockwise(weight, code, blocksize)
    rebuilt = dequantize_blockwise(indices, absmax, code, blocksize).view(weight.shape)
    return (torch.linalg.norm(weight - rebuilt) / torch.linalg.norm(weight)).item()


def int4_code() -> torch.Tensor:
    """Symmetric 4-bit integers, -7 to 7, divided by 7: the evenly spaced grid NF4 replaces."""
    return torch.arange(-7, 8) / 7


# -- The lab's sentiment task, with QLoRA --------------------------------------------------------


def qlora_fine_tuning(r: int = 8, lora_alpha: float = 16, double_quant: bool = True) -> Technique:
    """LoRA's technique on the sentiment task, with the frozen base quantized after A and B are made."""
    lora = lora_fine_tuning(r, lora_alpha)

    def prepare(model, tokenizer):
        return quantize_frozen_linears(lora.prepare(model, tokenizer), double_quant=double_quant)

    return replace(lora, prepare=prepare)


@recorded
@cached  # the page's doctests share one run
def run_qlora(r: int = 8, lora_alpha: float = 16, seed: int = 0):
    """Our QLoRA on the tiny model, with LoRA's tiny preset: 600 steps of 16 reviews at 3e-3."""
    technique = qlora_fine_tuning(r, lora_alpha)
    return run_on_tiny_model(technique, replace(PRESETS.tiny, seed=seed), lora_state_dict)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Fine-tune a causal LM with our QLoRA (LoRA over a base frozen in 4-bit NF4) "
        "to write the sentiment label after a review."
    )
    add_lora_arguments(parser)
    parser.add_argument("--no-double-quant", action="store_true", help="keep the absmax constants in float32")
    add_training_arguments(parser, PRESETS)
    add_output_argument(parser, "the model with the update merged into its dequantized weights")
    # The base is read into the computer's memory (bfloat16 where a GPU will run it) and
    # quantized onto the device one layer at a time: the GPU never holds it in 16 bits.
    args, model, tokenizer = parse_and_load(parser, argv, training=False, load_on="cpu")
    add_lora(model, r=args.lora_r, lora_alpha=args.lora_alpha)
    quantize_frozen_linears(model, double_quant=not args.no_double_quant, device=args.device)
    technique = replace(
        lora_fine_tuning(args.lora_r, args.lora_alpha), prepare=lambda model, tokenizer: model
    )
    run = run_technique(technique, model, tokenizer, training_config(args, PRESETS), keep_model=True)
    print(run.report("sentiment accuracy"))
    bits = storage_bits_per_weight(double_quant=not args.no_double_quant)
    print(f"{'base weights':22s} NF4, {bits:.3f} bits per weight")
    if args.output is not None:
        save_merged(run.model, tokenizer, args.output, args.device, technique)


def save_merged(model: nn.Module, tokenizer, output: Path, device: str, technique: Technique) -> None:
    """``--output``: the adapter first, then the model merged into its dequantized base.

    The merge happens in the computer's memory: the 16-bit model it makes may not fit on the
    GPU that trained the 4-bit one. It is scored again on the GPU only if it fits there.
    """
    output.mkdir(parents=True, exist_ok=True)  # made empty by the command line's check, already
    save_file(lora_state_dict(model), output / "lora_adapter.safetensors")  # kept, whatever happens next
    # The base's precision (its embedding's): bfloat16 where a GPU trained it.
    dtype = model.get_input_embeddings().weight.dtype
    merged = merge_and_unload(dequantize_linears(model.to("cpu"), dtype))
    if device == "cuda":
        torch.cuda.empty_cache()  # what the 4-bit model held is free now
    try:
        check_weights_fit(merged, device)
    except ValueError as error:
        print(f"{'after merging':22s} not scored again: {error}")
    else:
        print(f"{'after merging':22s} {score(technique.score(merged.to(device), tokenizer))}")
    save_if_asked(output, merged.to("cpu"), tokenizer)


if __name__ == "__main__":
    main_guard(main)
