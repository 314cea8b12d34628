"""DoRA from scratch: LoRA with each output's magnitude trained apart from its direction.

Liu et al. (2024) split a weight matrix into the length of each output's row of weights (a
magnitude, one number per output) and the row divided by its length (a direction). DoRA
trains the magnitudes directly, and the directions through LoRA's low-rank update:

    W' = m * (W0 + s B A) / ||W0 + s B A||,   the norm taken row by row.

The layer below is our ``LoraLinear`` plus that magnitude, in PEFT's names
(``lora_magnitude_vector``), so PEFT's DoRA adapters load into it. Run it on the lab's
sentiment task, or on a real model with ``--model``::

    python -m fieldguide.parameter_efficient.dora --lora-r 8 --lora-alpha 16
"""

from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import main_guard
from fieldguide.lab.experiment import run_on_tiny_model
from fieldguide.lab.records import recorded
from fieldguide.parameter_efficient.lora import (
    PRESETS,
    LoraLinear,
    add_lora,
    lora_fine_tuning,
    lora_state_dict,
)
from fieldguide.parameter_efficient.lora import main as lora_main


class DoraLinear(LoraLinear):
    """``m * (W0 + s B A) x / ||W0 + s B A||``: LoRA's update sets the direction, ``m`` the length."""

    def __init__(
        self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora=False
    ):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        # m starts at the rows' own lengths, so that W' = W0: training starts at the base model.
        # (B = 0 at the start, so the norm is the base weight's.)
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (d_out,)

    def weight_norm(self) -> torch.Tensor:
        """The length of each output's row of ``W0 + s B A``, in float32 whatever W0's precision: (d_out,)."""
        weight = self.base_layer.weight.float() + self.get_delta_weight()
        return torch.linalg.norm(weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        result = self.base_layer(x)  # W0 x + b, (..., d_out)
        if self.merged:
            return result
        # The norm is treated as a constant in the backward pass, to make training cheaper, as
        # Liu et al. propose (their section 4.3) and PEFT does.
        scale = self.lora_magnitude_vector / self.weight_norm().detach()  # m / ||W0 + s B A||, (d_out,)
        dropped = self.lora_dropout(x)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            # W0 x is the base layer's output without its bias
            base = result if self.base_layer.bias is None else result - self.base_layer.bias
        else:  # under dropout, W0 sees the same dropped input as the update, as in PEFT
            base = F.linear(dropped, self.base_layer.weight)
        update = self.lora_B(self.lora_A(dropped.to(self.lora_A.weight.dtype))) * self.scaling  # s B A x
        # result + (scale - 1) W0 x + scale s B A x = b + scale (W0 + s B A) x
        return (result + (scale - 1) * base + scale * update).to(result.dtype)

    def merge(self) -> None:
        """Fold magnitude and update into ``W0``: ``W = (m / ||W0 + s B A||) (W0 + s B A)``."""
        if self.merged:
            raise RuntimeError("this DoRA layer is merged already; unmerge it first")
        weight = self.base_layer.weight
        # The norm comes from the unmerged weight; unmerging needs that same number back.
        self._merged_scale = (self.lora_magnitude_vector / self.weight_norm()).detach().view(-1, 1)
        weight.data = (self._merged_scale * (weight.data + self.get_delta_weight())).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this DoRA layer is not merged")
        weight = self.base_layer.weight
        weight.data = (weight.data / self._merged_scale - self.get_delta_weight()).to(weight.dtype)
        self.merged = False


def add_dora(model: nn.Module, target_modules: Iterable[str] | str = "all-linear", **options) -> nn.Module:
    """``add_lora`` with ``DoraLinear`` layers, as PEFT's ``LoraConfig(use_dora=True)``; the
    ``options`` are ``add_lora``'s (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``)."""
    return add_lora(model, target_modules, layer_class=DoraLinear, **options)


# -- The lab's sentiment task, with DoRA ---------------------------------------------------------


@recorded
@cached  # the page's doctests share one run per setting
def run_dora(r: int = 8, lora_alpha: float = 16, seed: int = 0):
    """Our DoRA on the tiny model, with LoRA's tiny preset: 600 steps of 16 reviews at 3e-3."""
    technique = lora_fine_tuning(r, lora_alpha, layer_class=DoraLinear)
    return run_on_tiny_model(technique, replace(PRESETS.tiny, seed=seed), lora_state_dict)


def main(argv: list[str] | None = None) -> None:
    # LoRA's command line and presets, with DoRA's layers: the same rates suit both.
    lora_main(argv, layer_class=DoraLinear, name="DoRA")


if __name__ == "__main__":
    main_guard(main)
