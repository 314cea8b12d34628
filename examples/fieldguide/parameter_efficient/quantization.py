"""Quantization from scratch: weights (and activations) in fewer bits, and what it costs.

* **Absmax and zero-point quantization** map each row of a tensor onto b-bit integers: absmax
  symmetrically, by the row's largest magnitude; zero-point (affine, as Jacob et al., 2018,
  write it: r = S (q - Z)) onto the row's range, with zero kept exact.
* **LLM.int8()** (Dettmers et al., 2022) multiplies matrices in int8 with one absmax per row of
  each operand, and keeps the few feature columns with outliers out of 8 bits altogether. The
  int8 codes equal bitsandbytes' ``int8_vectorwise_quant``.
* **Round-to-nearest and GPTQ** (Frantar et al., 2023) quantize a trained model's weights after
  training. GPTQ rounds one input column at a time and moves each column's rounding error onto
  the columns still to round, in the proportions that the inverse Hessian of the layer's
  output error gives, so that the layer's outputs on calibration inputs change least.
* **Quantization-aware training** rounds in the forward pass and lets the gradient through as
  if it had not (the straight-through estimator).

The tests check each against its definition; GPTQ's column loop against the slower sequential
elimination it is derived from.
"""

import copy

import torch
from torch import nn

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import pack_texts

# -- Two ways to map floats to b-bit integers --------------------------------------------------


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` (rows, columns) as integers in [-(2^(b-1) - 1), 2^(b-1) - 1]: the row
    times ``q_max / absmax(row)``, rounded. Returns (codes, the absmax of each row, float32)."""
    q_max = 2 ** (bits - 1) - 1
    absmax = x.abs().amax(dim=-1).float()  # (rows,)
    # Written as x * (q_max / absmax), the order bitsandbytes computes in, so the codes agree
    # to the last bit; an all-zero row keeps a scale of 1 and codes of 0.
    codes = torch.round(x.float() * (q_max / absmax.masked_fill(absmax == 0, 1)).unsqueeze(-1))
    return codes.to(torch.int8 if bits <= 8 else torch.int32), absmax


def absmax_dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The values ``codes`` stand for: code * absmax / q_max, row by row."""
    return codes.float() * (absmax / (2 ** (bits - 1) - 1)).unsqueeze(-1)


def zero_point_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of ``x`` onto the integers 0 to 2^b - 1, spread over the row's range (widened to
    include 0, so that zero is stored exactly). Returns (codes, scale S, zero point Z), each
    row's value r coded as q = round(r / S) + Z, read back as S (q - Z)."""
    low = x.amin(dim=-1).clamp(max=0).float()
    high = x.amax(dim=-1).clamp(min=0).float()
    q_top = 2**bits - 1
    scale = ((high - low) / q_top).masked_fill(high == low, 1.0)  # a row of zeros: any scale
    zero = torch.round(-low / scale)
    codes = grid_codes(x.float(), scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return codes.to(torch.uint8 if bits <= 8 else torch.int32), scale, zero


def grid_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Equation (eq-zero-point) of the page: round(x / S) + Z, clamped to 0 to 2^b - 1, as floats
    (``scale`` and ``zero`` broadcast against ``x``)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def zero_point_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The values ``codes`` stand for: S (q - Z), row by row."""
    return (codes.float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def round_trip(x: torch.Tensor, bits: int, scheme: str = "zero-point") -> torch.Tensor:
    """``x`` quantized and read back, row by row: what the model computes with afterwards."""
    if scheme == "absmax":
        return absmax_dequantize(*absmax_quantize(x, bits), bits).to(x.dtype)
    if scheme == "zero-point":
        return zero_point_dequantize(*zero_point_quantize(x, bits)).to(x.dtype)
    raise ValueError(f"scheme must be 'absmax' or 'zero-point', got {scheme!r}")


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    """||approximation - exact|| / ||exact||, Frobenius norms: the error as a share of the signal."""
    return float((approximation.double() - exact.double()).norm() / exact.double().norm())


# -- LLM.int8(): vector-wise int8, outlier features apart ----------------------------------------


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The feature columns of ``x`` (tokens, features) holding any value of magnitude
    ``threshold`` or more (a boolean mask); none when ``threshold`` is 0."""
    if threshold <= 0:
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    return (x.abs() >= threshold).any(dim=0)


def int8_vectorwise(
    x: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8()'s quantization of one operand (rows, features): the outlier columns set to
    zero, then int8 absmax codes row by row. Returns (codes, absmax per row, outlier mask)."""
    outliers = outlier_columns(x, threshold)
    codes, absmax = absmax_quantize(x.masked_fill(outliers, 0))
    return codes, absmax, outliers


def llm_int8_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """``x @ weight.T`` the LLM.int8() way, for activations ``x`` (tokens, d_in) and a linear
    layer's ``weight`` (d_out, d_in).

    The outlier feature columns of ``x``, and the same input columns of ``weight``, multiply in
    full precision; the rest in int8, with one absmax per row of ``x`` (per token) and one per
    row of ``weight`` (per output), summed exactly in integers and scaled back.
    """
    x_codes, x_absmax, outliers = int8_vectorwise(x, threshold)
    w_codes, w_absmax = absmax_quantize(weight.masked_fill(outliers, 0))
    # Exact: each product of two int8 codes and their sum over d_in fit a float64's 53 bits.
    integer_product = x_codes.double() @ w_codes.double().T  # (tokens, d_out)
    regular = integer_product * torch.outer(x_absmax.double(), w_absmax.double()) / 127**2
    outlier = x[:, outliers].double() @ weight[:, outliers].double().T
    return (regular + outlier).to(x.dtype)


def per_tensor_int8_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with one absmax for all of ``x`` and one for all of ``weight``: the
    plain int8 quantization that LLM.int8() improves on."""
    x_codes, x_absmax = absmax_quantize(x.reshape(1, -1))
    w_codes, w_absmax = absmax_quantize(weight.reshape(1, -1))
    integer_product = x_codes.reshape(x.shape).double() @ w_codes.reshape(weight.shape).double().T
    return (integer_product * float(x_absmax * w_absmax) / 127**2).to(x.dtype)


# -- Post-training quantization: round-to-nearest and GPTQ -------------------------------------


def hessian(inputs: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """2 X^T X for a layer's calibration inputs X (n, d_in): the Hessian of its squared output
    error ||X W^T - X Q^T||^2 with respect to each row of Q, in float64. ``damp`` times the
    mean diagonal is added to the diagonal, as GPTQ does, so that it can be inverted; an input
    that is always zero gets a diagonal of 1 (its weights never matter)."""
    x = inputs.double()
    h = 2 * x.T @ x
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    return h


def gptq_quantize(weight: torch.Tensor, inputs: torch.Tensor, bits: int, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al., 2023) of one linear layer: ``weight`` (d_out, d_in) rounded to a
    ``bits``-bit zero-point grid per output row (the round-to-nearest grid), given calibration
    ``inputs`` (n, d_in). Returns the weight as the model computes with it afterwards.

    Columns are rounded left to right. Each column's error, divided by the diagonal entry of
    the upper Cholesky factor U of H^-1, is subtracted from the later columns times that row of
    U: the optimal update of the weights still free (the paper's equation (3)), for all rows at
    once, because every row shares H.
    """
    work = weight.double().clone()
    _, scale, zero = zero_point_quantize(weight, bits)  # the grid, fixed by the original weights
    scale, zero = scale.double(), zero.double()
    work[:, (inputs == 0).all(dim=0)] = 0  # a weight that only ever meets zero: any value does
    h = hessian(inputs, damp)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rounded = torch.empty_like(work)
    for j in range(work.shape[1]):
        column = work[:, j]
        q = (grid_codes(column, scale, zero, bits) - zero) * scale
        rounded[:, j] = q
        error = (column - q) / u[j, j]
        work[:, j + 1 :] -= error.unsqueeze(1) * u[j, j + 1 :].unsqueeze(0)
    return rounded.to(weight.dtype)


def calibration_blocks(tokenizer, num_stories: int = 64, block_size: int = 64) -> torch.Tensor:
    """Token blocks of the tiny model's pretraining stories (seed 0, as it was trained on), the
    calibration text GPTQ reads: (blocks, block_size) token ids."""
    blocks = pack_texts(tokenizer, make_corpus(num_stories, seed=0), block_size)
    return torch.tensor([block["input_ids"] for block in blocks])


def linear_layers(model: nn.Module) -> list[str]:
    """The names of every linear layer but the output layer, in the order the model runs them."""
    output_layer = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output_layer
    ]


def layer_inputs(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """What layer ``name`` reads when ``model`` runs on ``ids``: (tokens, d_in)."""
    seen = []
    hook = model.get_submodule(name).register_forward_hook(lambda _, args, __: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        hook.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def quantize_weights(
    model: nn.Module, bits: int, method: str = "gptq", calibration: torch.Tensor | None = None
):
    """A copy of ``model`` with every linear layer's weight but the output layer's rounded to
    ``bits`` bits, per output row, by ``method``: "rtn" (round to nearest) or "gptq".

    GPTQ goes layer by layer in the order the model runs them, each layer calibrated on what it
    reads once the layers before it are quantized, as the paper does. The weights stay
    float32 tensors holding the rounded values: this measures the error, not the storage.
    """
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq" and calibration is None:
        raise ValueError("GPTQ needs calibration token ids")
    quantized = copy.deepcopy(model).eval()
    for name in linear_layers(quantized):
        layer = quantized.get_submodule(name)
        if method == "rtn":
            new = round_trip(layer.weight.detach(), bits)
        else:
            new = gptq_quantize(layer.weight.detach(), layer_inputs(quantized, name, calibration), bits)
        with torch.no_grad():
            layer.weight.copy_(new)
    return quantized


# -- Quantization-aware training --------------------------------------------------------------


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` rounded to its zero-point grid in the forward pass, unchanged in the backward pass:
    the straight-through estimator, which treats rounding's derivative (zero almost
    everywhere) as 1, so that the float weights under the rounding keep learning."""
    return x + (round_trip(x, bits) - x).detach()
