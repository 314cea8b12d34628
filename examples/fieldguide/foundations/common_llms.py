"""How many parameters a Llama-family model has, worked out from its configuration alone.

A model card says "7B"; the configuration says exactly how many. Every weight matrix of a
Llama-style decoder (Llama 2 and 3, Mistral, the lab's tiny model) has a shape fixed by a
handful of numbers in ``config.json``, so the total is a short formula. The module checks it
against a model built on PyTorch's ``meta`` device, which has every parameter's shape but
no memory behind it, so even a 70B model is "built" in a fraction of a second::

    python -m fieldguide.foundations.common_llms
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from fieldguide.lab.cli import example_parser, main_guard
from fieldguide.lab.loading import ModelLoadError, load_config

# Architectures whose weights are exactly the Llama decoder's (Mistral's sliding window
# changes the attention pattern, not the weights).
SUPPORTED_MODEL_TYPES = {"llama", "mistral"}


def head_dim(config) -> int:
    """d_h, the width of one attention head: set explicitly, or d_model / H."""
    explicit = getattr(config, "head_dim", None)
    return explicit or config.hidden_size // config.num_attention_heads


def attention_parameters(config) -> int:
    """W_q and W_o are d x (H d_h); W_k and W_v are d x (H_kv d_h): equation (eq-attn-params)."""
    d, d_h = config.hidden_size, head_dim(config)
    q_width = config.num_attention_heads * d_h  # all query heads side by side
    kv_width = config.num_key_value_heads * d_h  # grouped-query attention shares these
    weights = 2 * d * q_width + 2 * d * kv_width  # q and o, then k and v
    # Llama's attention_bias adds a bias to each of the four outputs; Mistral has no such option.
    biases = (q_width + 2 * kv_width + d) if getattr(config, "attention_bias", False) else 0
    return weights + biases


def mlp_parameters(config) -> int:
    """SwiGLU: gate and up map d -> d_ff, down maps d_ff -> d: three matrices of d x d_ff."""
    d, d_ff = config.hidden_size, config.intermediate_size
    biases = (2 * d_ff + d) if getattr(config, "mlp_bias", False) else 0
    return 3 * d * d_ff + biases


def llama_parameter_count(config) -> int:
    """The exact parameter count of a Llama-style decoder: equation (eq-param-count).

    ``config`` is a transformers ``LlamaConfig`` or ``MistralConfig``, or any configuration
    loaded with ``AutoConfig.from_pretrained`` for a model of those types.
    """
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"the formula covers {sorted(SUPPORTED_MODEL_TYPES)} models, not {config.model_type!r}: "
            "other architectures place biases, norms and experts differently"
        )
    d, V = config.hidden_size, config.vocab_size
    norms = 2 * d  # one RMSNorm gain vector before attention, one before the MLP
    per_layer = attention_parameters(config) + mlp_parameters(config) + norms
    embedding = V * d
    lm_head = 0 if config.tie_word_embeddings else V * d  # tied: the output reuses E
    return embedding + config.num_hidden_layers * per_layer + d + lm_head  # + d: the final norm


def meta_parameter_count(config) -> int:
    """Build the model on the meta device (shapes only, no memory) and count its parameters."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def weight_gigabytes(num_parameters: int, dtype: str = "bfloat16") -> float:
    """Memory the weights alone take, in GB (10**9 bytes); training needs several times more."""
    element = getattr(torch, dtype, None)
    if isinstance(element, torch.dtype):
        return num_parameters * element.itemsize / 1e9  # itemsize: bytes per element
    raise ValueError(f"unknown dtype {dtype!r}; name a torch dtype such as 'bfloat16' or 'int8'")


# Published shapes, from each model's config.json (and the Mistral 7B paper's Table 1).
PUBLISHED_CONFIGS = {
    "llama-2-7b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "llama-3-8b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
    "mistral-7b": MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        sliding_window=4096,
        tie_word_embeddings=False,
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Count a model's parameters from its configuration; no weights are loaded.")
    args = parser.parse_args(argv)
    try:  # only config.json is read, so even a 70B model is counted in a second
        config = load_config(args.model)
    except ModelLoadError as error:
        parser.error(f"argument --model: {error}")
    ours, actual = llama_parameter_count(config), meta_parameter_count(config)
    print(f"from the config: {ours:,}\non the meta device: {actual:,}")
    for name, shape in {args.model: config, **PUBLISHED_CONFIGS}.items():
        count = llama_parameter_count(shape)
        print(f"{name:14s} {count:>15,} parameters, {weight_gigabytes(count):7.2f} GB in bf16")


if __name__ == "__main__":
    main_guard(main)
