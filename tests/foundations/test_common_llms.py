"""The parameter-count formula against models built on the meta device, shape by shape."""

import pytest
from transformers import LlamaConfig, MistralConfig

from fieldguide.foundations import common_llms
from fieldguide.foundations.common_llms import (
    PUBLISHED_CONFIGS,
    llama_parameter_count,
    meta_parameter_count,
    weight_gigabytes,
)


def small(**overrides) -> LlamaConfig:
    """A small Llama shape; each case below changes one thing about it."""
    shape = {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**shape, **overrides})


CASES = {
    **PUBLISHED_CONFIGS,
    "untied": small(),
    "tied": small(tie_word_embeddings=True),
    "gqa-4-kv-heads": small(num_key_value_heads=4),
    "multi-query-1-kv-head": small(num_key_value_heads=1),
    "explicit-head-dim": small(head_dim=16),
    "attention-bias": small(attention_bias=True, num_key_value_heads=2),
    "mlp-bias": small(mlp_bias=True),
    "mistral-tied-gqa": MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_formula_equals_the_meta_device_count(name):
    assert llama_parameter_count(CASES[name]) == meta_parameter_count(CASES[name])


def test_the_tiny_model(tiny):
    model, _ = tiny
    assert llama_parameter_count(model.config) == model.num_parameters() == 424_576


@pytest.mark.parametrize(
    ("name", "expected"),
    [("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096)],
)
def test_published_counts(name, expected):
    assert llama_parameter_count(PUBLISHED_CONFIGS[name]) == expected


def test_tying_saves_exactly_one_vocabulary_matrix():
    untied, tied = small(), small(tie_word_embeddings=True)
    assert llama_parameter_count(untied) - llama_parameter_count(tied) == 1000 * 64


def test_other_architectures_are_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="not 'gpt2'"):
        llama_parameter_count(GPT2Config())


@pytest.mark.parametrize(("dtype", "gigabytes"), [("float32", 4.0), ("bfloat16", 2.0), ("int8", 1.0)])
def test_weight_gigabytes(dtype, gigabytes):
    assert weight_gigabytes(10**9, dtype) == gigabytes


def test_weight_gigabytes_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'fp7'"):
        weight_gigabytes(10, "fp7")


def test_the_command_line_prints_the_counts(capsys):
    common_llms.main([])
    out = capsys.readouterr().out
    assert "from the config: 424,576" in out and "on the meta device: 424,576" in out
    assert "6,738,415,616" in out


def test_the_command_line_names_a_bad_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common_llms.main(["--model", "/no/such/dir"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --model: no local folder named '/no/such/dir'" in err
