"""Finding a model's linear layers by name and replacing them: the first step of every
parameter-efficient method that wraps layers (LoRA, DoRA, QLoRA, IA3).

PEFT names the layers to adapt by the last part of their module name, ``target_modules``:
``["q_proj", "v_proj"]`` matches the query and value projections of every block, and
``"all-linear"`` every linear layer but the output layer. The lab reads the names the same way.
"""

from collections.abc import Callable, Iterable

import torch
from torch import nn


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of a model's linear layers: what ``target_modules`` can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def output_layer_name(model: nn.Module) -> str | None:
    """The last part of the output layer's name (``lm_head`` in Llama), or None."""
    output_layer = model.get_output_embeddings()
    return next((name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is output_layer), None)


def target_names(model: nn.Module, target_modules: Iterable[str] | str) -> set[str]:
    """``target_modules`` as a set of last names, with ``"all-linear"`` spelt out."""
    if target_modules == "all-linear":
        return set(linear_names(model)) - {output_layer_name(model)}
    if isinstance(target_modules, str):
        return {target_modules}  # one name, not its letters
    return set(target_modules)


def replace_linear_layers(
    model: nn.Module, target_modules: Iterable[str] | str, replace: Callable[[str, nn.Linear], nn.Module]
) -> nn.Module:
    """Replace every ``nn.Linear`` whose last name is a target with ``replace(last name, layer)``.

    A target that names no linear layer is an error: a misspelt one would otherwise leave its
    layers untrained, silently.
    """
    targets = target_names(model, target_modules)
    chosen = [
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear)
    ]
    if missing := sorted(targets - {name.rsplit(".", 1)[-1] for name in chosen}):
        raise ValueError(f"no linear layer is named {missing}; the model's are named {linear_names(model)}")
    for name in chosen:
        model.set_submodule(name, replace(name.rsplit(".", 1)[-1], model.get_submodule(name)))
    return model


def merge_and_unwrap(model: nn.Module, layer_type: type[nn.Module]) -> nn.Module:
    """Merge every ``layer_type`` layer (an adapter with ``merge``, ``merged`` and a
    ``base_layer``) and put its base layer back: a plain model, as fast as the base."""
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_type):
            if not module.merged:
                module.merge()
            model.set_submodule(name, module.base_layer)
    return model


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model``'s trainable parameters, under their state-dict names: the adapter
    of a method that trains parameters of its own choosing (adapters and gains, biases)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in trained}
