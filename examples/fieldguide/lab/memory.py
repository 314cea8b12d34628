"""What a training run needs in memory before its first step, and a check that it fits.

Training with AdamW keeps, for every trainable weight, its gradient and the optimizer's two
moment estimates, in the weight's own dtype; the lab keeps its weights in float32 (4 bytes
each), even under bf16 autocast, so a trainable weight costs 16 bytes. Activations come on top and depend on the batch, so
this is a floor, not an estimate of the peak.
"""

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

# The shape of Qwen2.5-0.5B (its config.json): the model the pages' "on a real model" commands
# name, small enough to fully fine-tune on one GPU.
QWEN2_5_0_5B = Qwen2Config(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight as stored."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def static_training_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight as stored, plus, for each trainable one, a gradient and AdamW's
    two moment estimates, each in the weight's own dtype (as PyTorch keeps them)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weight_bytes(model) + 3 * trainable


def full_fine_tuning_bytes(config) -> int:
    """``static_training_bytes`` of a model built from ``config`` on the meta device.

    The meta device gives every tensor its shape and dtype but no memory, so even a 70B
    model's needs are worked out in a second.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return static_training_bytes(model)


def inference_bytes(config, dtype: torch.dtype = torch.bfloat16) -> int:
    """The weights of a model built from ``config`` in ``dtype``: what answering needs, before
    the activations and the key/value cache of the tokens in flight."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return weight_bytes(model)


def check_fits(
    need: int,
    free: int,
    what: str = "training this model",
    needs: str = "its weights, gradients and AdamW state alone, before activations",
) -> None:
    """Refuse a run that needs more than ``free`` bytes, with both numbers and the way out."""
    if need > free:
        raise ValueError(
            f"{what} needs {need / 1e9:.1f} GB for {needs}, and the GPU has {free / 1e9:.1f} GB "
            "free: choose a smaller model, or a parameter-efficient method that trains far fewer weights"
        )


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_memory(model: torch.nn.Module) -> None:
    """On a GPU, refuse a run that cannot fit, before it spends minutes failing.

    One GPU's free memory against the floor of ``static_training_bytes``: activations and the
    memory other processes take come on top.
    """
    device = _device_of(model)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # The weights are on the GPU already: the memory they hold counts as available to them.
        check_fits(static_training_bytes(model), free + weight_bytes(model))


def check_weights_fit(model: torch.nn.Module, device: str) -> None:
    """Before moving a model onto a GPU, refuse one whose weights alone would not fit there."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        check_fits(weight_bytes(model), free, what="loading this model", needs="its weights alone")
