"""Quantization from scratch against its definitions and bitsandbytes: absmax codes equal to
bitsandbytes' int8_vectorwise_quant (outlier columns too, where the two definitions agree), rounding errors within half a step,
LLM.int8()'s decomposition exact where it should be, GPTQ equal to the sequential elimination it
is derived from (and to round-to-nearest when the input columns are orthogonal), and a quantized
model that keeps its output layer and leaves the original alone."""

import bitsandbytes.functional as bnb
import pytest
import torch

from fieldguide.parameter_efficient.quantization import (
    absmax_dequantize,
    absmax_quantize,
    fake_quantize,
    gptq_quantize,
    hessian,
    int8_vectorwise,
    linear_layers,
    llm_int8_matmul,
    per_tensor_int8_matmul,
    quantize_weights,
    relative_error,
    round_trip,
    zero_point_dequantize,
    zero_point_quantize,
)
from lab_factories import random_llama


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (8, 32), (33, 130)])
def test_absmax_codes_are_bitsandbytes_int8_codes(shape, dtype):
    x = (3 * randn(*shape)).to(dtype)
    codes, absmax = absmax_quantize(x)
    theirs, their_absmax, outliers = bnb.int8_vectorwise_quant(x.clone())
    assert torch.equal(codes, theirs) and torch.equal(absmax, their_absmax)
    assert outliers is None


def test_outlier_columns_are_bitsandbytes_outlier_columns():
    """Where the paper's decomposition and bitsandbytes' agree: every value of an outlier column
    is an outlier, so setting the column apart and setting its outliers apart are the same."""
    x = randn(6, 16)
    x[:, [3, 11]] = 8 * torch.sign(x[:, [3, 11]])  # two features large in every row, as at scale
    codes, absmax, outliers = int8_vectorwise(x, threshold=6.0)
    theirs, their_absmax, their_columns = bnb.int8_vectorwise_quant(x.clone(), threshold=6.0)
    assert torch.equal(codes, theirs) and torch.equal(absmax, their_absmax)
    assert outliers.nonzero().flatten().tolist() == their_columns.tolist() == [3, 11]
    assert not codes[:, outliers].any()


def test_where_bitsandbytes_parts_from_the_paper_an_outlier_columns_small_values_set_the_scale():
    """bitsandbytes zeroes only the outlier values before taking each row's absmax; the paper
    (and this code) sets the whole column apart. A row whose largest regular value sits in an
    outlier column shows the difference, and only that row does."""
    x = randn(4, 8) / 4
    x[0, 3] = 9.0  # column 3 is an outlier column because of row 0 alone
    x[1, 3] = 0.9  # and row 1's largest value lies in that column
    codes, absmax, _ = int8_vectorwise(x, threshold=6.0)
    theirs, their_absmax, _ = bnb.int8_vectorwise_quant(x.clone(), threshold=6.0)
    assert their_absmax[1] == pytest.approx(0.9) and absmax[1] < 0.9
    assert torch.equal(codes[2:], theirs[2:]) and not torch.equal(codes[1], theirs[1])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_absmax_rounds_within_half_a_step(bits):
    x = randn(16, 64)
    codes, absmax = absmax_quantize(x, bits)
    q_max = 2 ** (bits - 1) - 1
    assert codes.abs().max() == q_max  # each row's largest value lands on the end of the grid
    step = (absmax / q_max).unsqueeze(-1)
    assert ((absmax_dequantize(codes, absmax, bits) - x).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_point_spans_the_range_keeps_zero_and_rounds_within_half_a_step(bits):
    x = randn(16, 64) + 1.5  # mostly positive: a range that is not centred on zero
    codes, scale, zero = zero_point_quantize(x, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    back = zero_point_dequantize(codes, scale, zero)
    assert ((back - x).abs() <= scale.unsqueeze(-1) / 2 + 1e-6).all()
    with_zero = torch.cat([x, torch.zeros(16, 1)], dim=1)
    assert (round_trip(with_zero, bits)[:, -1] == 0).all()  # zero is stored exactly


def test_zero_point_beats_absmax_on_one_signed_values():
    x = randn(16, 64).abs()  # like the output of a ReLU: absmax wastes the negative codes
    assert (
        relative_error(round_trip(x, 4, "zero-point"), x)
        < relative_error(round_trip(x, 4, "absmax"), x) / 1.5
    )


def test_an_all_zero_row_stays_zero():
    x = torch.zeros(2, 5)
    assert torch.equal(round_trip(x, 4, "absmax"), x) and torch.equal(round_trip(x, 4), x)


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="scheme"):
        round_trip(randn(2, 3), 4, "log")


def test_llm_int8_with_every_column_an_outlier_is_the_exact_product():
    x, w = randn(4, 16), randn(8, 16, seed=1)
    assert torch.allclose(llm_int8_matmul(x, w, threshold=1e-9), x @ w.T, atol=1e-6)


def test_llm_int8_without_outliers_is_the_product_of_the_dequantized_operands():
    x, w = randn(4, 16), randn(8, 16, seed=1)
    expected = absmax_dequantize(*absmax_quantize(x)) @ absmax_dequantize(*absmax_quantize(w)).T
    assert torch.allclose(llm_int8_matmul(x, w, threshold=0.0), expected, atol=1e-5)


def test_an_outlier_feature_spoils_per_tensor_int8_and_not_llm_int8():
    x, w = randn(16, 64), randn(32, 64, seed=1) / 8
    x[:, 5] *= 30  # one feature dimension 30 times the rest, in every token
    exact = x @ w.T
    llm = relative_error(llm_int8_matmul(x, w, threshold=6.0), exact)
    assert llm < relative_error(llm_int8_matmul(x, w, threshold=0.0), exact) / 5
    assert llm < relative_error(per_tensor_int8_matmul(x, w), exact) / 5


def sequential_elimination(weight, inputs, bits, damp=0.01):
    """GPTQ's update as first derived (optimal brain quantization with a fixed column order):
    after rounding column j, the free columns F move by -(w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_j,
    with H_F^-1 the inverse of H restricted to the columns not yet rounded, inverted afresh at
    every step. Slow, and written independently of the Cholesky form it must equal."""
    work = weight.double().clone()
    _, scale, zero = zero_point_quantize(weight, bits)
    scale, zero = scale.double(), zero.double()
    h = hessian(inputs, damp)
    rounded = torch.empty_like(work)
    for j in range(work.shape[1]):
        free = list(range(j, work.shape[1]))
        inverse = torch.linalg.inv(h[free][:, free])
        q = (torch.clamp(torch.round(work[:, j] / scale) + zero, 0, 2**bits - 1) - zero) * scale
        rounded[:, j] = q
        work[:, free] -= ((work[:, j] - q) / inverse[0, 0]).unsqueeze(1) * inverse[0].unsqueeze(0)
    return rounded


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(6, 10), (3, 17)])
def test_gptq_equals_the_sequential_elimination_it_is_derived_from(bits, shape):
    d_out, d_in = shape
    weight = randn(d_out, d_in).double()
    inputs = randn(40, d_in, seed=1).double() @ randn(d_in, d_in, seed=2).double()  # correlated inputs
    assert torch.allclose(
        gptq_quantize(weight, inputs, bits), sequential_elimination(weight, inputs, bits), atol=1e-9
    )


def test_gptq_is_round_to_nearest_when_the_input_columns_are_orthogonal():
    weight = randn(5, 8)
    inputs = torch.eye(8).repeat(3, 1)  # X^T X, so H, is a multiple of I: no error is worth moving
    assert torch.equal(gptq_quantize(weight, inputs, 3), round_trip(weight, 3))


def test_gptq_lowers_the_layers_output_error_on_its_calibration_inputs():
    weight = randn(16, 32)
    inputs = randn(200, 32, seed=1) @ randn(32, 32, seed=2)
    exact = inputs @ weight.T
    gptq = relative_error(inputs @ gptq_quantize(weight, inputs, 3).T, exact)
    assert gptq < 0.8 * relative_error(inputs @ round_trip(weight, 3).T, exact)


def test_gptq_zeroes_the_weights_of_an_input_that_is_always_zero():
    inputs = randn(30, 6)
    inputs[:, 2] = 0
    assert (gptq_quantize(randn(4, 6), inputs, 4)[:, 2] == 0).all()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_weights_rounds_every_linear_layer_but_the_output_layer(method):
    model = random_llama()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    quantized = quantize_weights(model, 2, method, calibration)
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), name  # the original is left alone
    assert torch.equal(quantized.lm_head.weight, model.lm_head.weight)
    assert len(linear_layers(quantized)) == 7 * 2
    for name in linear_layers(quantized):
        weight = quantized.get_submodule(name).weight
        assert max(len(row.unique()) for row in weight) <= 4, name  # 2 bits: four values a row


def test_quantize_weights_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="method"):
        quantize_weights(random_llama(), 4, "awq")
    with pytest.raises(ValueError, match="calibration"):
        quantize_weights(random_llama(), 4, "gptq")


def test_fake_quantization_rounds_forward_and_passes_the_gradient_straight_through():
    x = randn(3, 8).requires_grad_(True)
    y = fake_quantize(x, 2)
    assert torch.equal(y, round_trip(x.detach(), 2))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
