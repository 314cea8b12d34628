"""What a training run needs in memory before its first step, and a check that it fits.

Training with AdamW keeps, for every trainable weight, its gradient and the optimizer's two
moment estimates; the lab keeps all three in float32 (4 bytes each), and the weights in
float32 too, even under bf16 autocast. Activations come on top and depend on the batch, so
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


def static_training_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight as stored, plus a float32 gradient and AdamW's two float32
    moments for each trainable one."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + trainable * (4 + 4 + 4)


def full_fine_tuning_bytes(config) -> int:
    """``static_training_bytes`` of a model built from ``config`` on the meta device.

    The meta device gives every tensor its shape and dtype but no memory, so even a 70B
    model's needs are worked out in a second.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return static_training_bytes(model)


def check_fits(need: int, free: int) -> None:
    """Refuse a run whose weights and optimizer state alone need more than ``free`` bytes."""
    if need > free:
        raise ValueError(
            f"training this model needs {need / 1e9:.1f} GB for its weights, gradients and AdamW "
            f"state alone, before activations, and the GPU has {free / 1e9:.1f} GB free: choose a "
            "smaller model, or a parameter-efficient method that trains far fewer weights"
        )


def check_memory(model: torch.nn.Module) -> None:
    """On a GPU, refuse a run that cannot fit, before it spends minutes failing."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        check_fits(static_training_bytes(model), free)
