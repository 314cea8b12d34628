"""The from-scratch causal attention against PyTorch's, and the causal property itself."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from fieldguide.foundations.what_are_llms import causal_attention, causal_mask, llama_attention
from lab_factories import random_llama

# (batch, heads, sequence length, head dimension)
SHAPES = [
    (1, 1, 1, 8),  # a single token attends only to itself
    (2, 4, 16, 32),  # the tiny model's head size
    (3, 2, 7, 5),  # odd sizes, d not a power of two
    (1, 8, 64, 16),  # longer sequence
]


def _qkv(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(3)]


def test_causal_mask_is_lower_triangular():
    expected = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    assert torch.equal(causal_mask(3), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_scaled_dot_product_attention(shape):
    q, k, v = _qkv(shape)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention(q, k, v), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [0, 5, 14])
def test_position_t_ignores_later_positions(t):
    q, k, v = _qkv((2, 4, 16, 32))
    before = causal_attention(q, k, v)
    # Change every key, value and query after position t.
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
    after = causal_attention(q2, k2, v2)
    assert torch.equal(before[:, :, : t + 1], after[:, :, : t + 1])
    assert not torch.allclose(before[:, :, t + 1 :], after[:, :, t + 1 :])


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 1)])
def test_llama_attention_matches_grouped_query_sdpa(heads, kv_heads):
    q = torch.randn(2, heads, 9, 16)
    k, v = torch.randn(2, kv_heads, 9, 16), torch.randn(2, kv_heads, 9, 16)
    output, weights = llama_attention(None, q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert weights is None
    assert output.shape == (2, 9, heads, 16)  # (B, T, H, d)
    torch.testing.assert_close(output, expected.transpose(1, 2), atol=1e-6, rtol=0)


def test_llama_attention_refuses_a_key_value_cache():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="whole sequence"):
        llama_attention(None, q, k, v)


def test_a_llama_model_computes_the_same_logits_with_it():
    AttentionInterface.register("fieldguide", llama_attention)
    model = random_llama(seed=0)  # grouped-query attention, as in the lab's tiny model
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        model.set_attn_implementation("fieldguide")
        ours = model(input_ids=input_ids).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
