"""Bottleneck adapters from scratch: a small network added after each sublayer of a frozen model.

Houlsby et al. (2019) insert an *adapter* twice in every transformer block: after the
attention's output projection and after the feed-forward network, each on the sublayer's
output before the residual stream adds it. An adapter projects its input down to a few
dimensions, applies a nonlinearity, projects back up and adds the result to its own input:
a bottleneck with a skip connection. Only the adapters (and, as in the paper, the blocks'
normalisation gains) train. On a Llama block the two sublayer outputs are those of
``o_proj`` and ``down_proj``, so an adapter here wraps those two layers. PEFT has no
bottleneck adapters; the tests check ours against the paper's definition. Run it on the lab's
sentiment task, or on a real model with ``--model``::

    python -m fieldguide.parameter_efficient.adapters --max-steps 300
"""

import json
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    TINY,
    add_output_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    positive_int,
    training_config,
)
from fieldguide.lab.experiment import (
    Presets,
    Technique,
    best_learning_rate,
    real_model_training,
    run_on_tiny_model,
    run_technique,
)
from fieldguide.lab.layers import replace_linear_layers, trained_state_dict
from fieldguide.lab.loading import parse_and_load
from fieldguide.lab.metrics import sentiment_outcomes
from fieldguide.lab.records import recorded
from fieldguide.lab.tasks import (
    ClassificationExample,
    sentiment_task,
    sentiment_validation_split,
    verbalized_example,
)
from fieldguide.lab.training import TrainConfig


class BottleneckAdapter(nn.Module):
    """A frozen sublayer's output layer followed by an adapter: equation (eq-adapter)."""

    def __init__(self, base_layer: nn.Linear, bottleneck_size: int) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        d, device = base_layer.out_features, base_layer.weight.device
        # Made in float32 whatever the base's dtype, as every adapter on this site is.
        self.adapter_down = nn.Linear(d, bottleneck_size, device=device)  # d -> d_bn, PyTorch's own start
        self.non_linearity = nn.ReLU()
        self.adapter_up = nn.Linear(bottleneck_size, d, device=device)  # d_bn -> d
        # Zero, as LoRA's B: the adapter adds nothing at first, so training starts at the base model.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        """The sublayer's output ``h`` plus ``W_up f(W_down h + b_down) + b_up``."""
        h = self.base_layer(x)  # (..., d): what the sublayer would add to the residual stream
        down = self.adapter_down(h.to(self.adapter_down.weight.dtype))  # (..., d_bn), in float32
        bottleneck = self.non_linearity(down)
        return h + self.adapter_up(bottleneck).to(h.dtype)  # the adapter's own skip connection


# The output layers of a Llama block's two sublayers: attention's, and the feed-forward network's.
TARGET_MODULES = ("o_proj", "down_proj")


def norm_names(model: nn.Module) -> list[str]:
    """The normalisation layers' parameters (``weight`` of every ``*norm``): the gains the paper
    also trains (its models' layer norms; Llama's RMSNorms have a gain and no bias)."""
    return [name for name, _ in model.named_parameters() if name.rsplit(".", 2)[-2].endswith("norm")]


def add_adapters(
    model: nn.Module,
    bottleneck_size: int,
    target_modules: Iterable[str] = TARGET_MODULES,
    train_norms: bool = True,
) -> nn.Module:
    """Freeze ``model``, put an adapter after every targeted layer, and (as the paper does)
    train the normalisation gains with them."""
    gains = [model.get_parameter(name) for name in norm_names(model)]
    if train_norms and any(gain.dtype != torch.float32 for gain in gains):
        # AdamW's small updates would round away in a 16-bit gain.
        raise ValueError(
            "train_norms needs float32 normalisation gains; this base's are 16-bit: pass train_norms=False"
        )
    model.requires_grad_(False)
    replace_linear_layers(
        model, target_modules, lambda name, layer: BottleneckAdapter(layer, bottleneck_size)
    )
    for gain in gains if train_norms else []:
        gain.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what trained: the adapters' weights and biases, and the normalisation gains."""
    return trained_state_dict(model)


# -- Saving and loading ------------------------------------------------------------------------

ADAPTER_FILE, SETTINGS_FILE = "adapters.safetensors", "adapters.json"


def save_adapters(model: nn.Module, directory: Path, bottleneck_size: int, base_name: str | None) -> None:
    """Save what trained (``adapter_state_dict``) and the settings that rebuild it, for
    ``load_adapters``. ``base_name`` is the base's Hub id or folder (None: the lab's tiny model).

    PEFT has no bottleneck adapters to load them, so this is the lab's own small format: the
    tensors as safetensors, and the settings as JSON beside them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), directory / ADAPTER_FILE)
    settings = {
        "bottleneck_size": bottleneck_size,
        "target_modules": list(TARGET_MODULES),
        "base_model_name_or_path": base_name,
    }
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def load_adapters(base: nn.Module, directory: Path) -> nn.Module:
    """``base`` (frozen, changed in place) with the adapters and gains ``save_adapters`` saved
    in ``directory``: the fine-tuned model, ready to answer. A file that does not fit the base
    (missing adapters, or tensors of another shape or name) is refused and the base left as it
    was; a base with another name than the one the adapters were trained on is loaded, with a
    warning, since a local copy of the same model has another name too."""
    settings = json.loads((directory / SETTINGS_FILE).read_text())
    trained_on, this_base = settings["base_model_name_or_path"], getattr(base.config, "name_or_path", None)
    if trained_on is not None and trained_on != this_base:
        warnings.warn(
            f"the adapters in {directory} were trained on {trained_on!r}, and this base is {this_base!r}: "
            "unless they are the same weights, the adapters will not do what they learned",
            stacklevel=2,
        )
    requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
    model = add_adapters(base, settings["bottleneck_size"], settings["target_modules"], train_norms=False)
    saved = load_file(directory / ADAPTER_FILE, device=str(next(model.parameters()).device))
    try:
        check_fits(saved, model.state_dict(), directory)
    except ValueError:  # put the base back as it came: a refused file changes nothing
        for name, module in list(model.named_modules()):
            if isinstance(module, BottleneckAdapter):
                model.set_submodule(name, module.base_layer)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        raise
    model.load_state_dict(saved, strict=False)  # the base's own weights are not in the file
    return model.eval().requires_grad_(False)  # to train on, set requires_grad on what should train


def check_fits(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], directory: Path) -> None:
    """Refuse ``saved`` unless every tensor has a place of its shape in ``expected`` (the state
    dict of the base with adapters) and every adapter tensor there is saved."""
    if foreign := sorted(set(saved) - set(expected)):
        raise ValueError(
            f"{directory} holds {foreign[0]}, which this base has no place for: saved from another model?"
        )
    adapters = {name for name in expected if ".adapter_" in name}
    if absent := sorted(adapters - set(saved)):
        raise ValueError(f"{directory} lacks {absent[0]} and {len(absent) - 1} more adapter tensors")
    if wrong := [name for name, tensor in saved.items() if tensor.shape != expected[name].shape]:
        raise ValueError(
            f"{directory}'s {wrong[0]} has shape {tuple(saved[wrong[0]].shape)}, this base's {tuple(expected[wrong[0]].shape)}"
        )


# -- The lab's sentiment task, with adapters ---------------------------------------------------

BOTTLENECK_SIZE = 32  # d_bn: about as many trained numbers as LoRA's rank 8 on the tiny model
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)  # the rates the page tries, on a validation split

PRESETS = Presets(
    # 1,000 steps of 16 reviews (at LoRA's 600 the loss was still falling at the best rate);
    # the rate is the one the page's search on the validation split chose (see
    # choose_learning_rate).
    tiny=TrainConfig(max_steps=1000, batch_size=16, learning_rate=3e-3),
    # A real model: LoRA's real-model rate, inside the paper's GLUE search (3e-5, 3e-4, 3e-3,
    # with Adam, on BERT); untested here.
    real=real_model_training(max_steps=300, learning_rate=2e-4),
)


def adapter_tuning(
    train: list[ClassificationExample],
    scored: list[ClassificationExample],
    bottleneck_size: int = BOTTLENECK_SIZE,
    train_norms: bool = True,
) -> Technique:
    """Adapters on reviews: trained on ``train``, scored on ``scored``."""
    return Technique(
        prepare=lambda model, tokenizer: add_adapters(model, bottleneck_size, train_norms=train_norms),
        data=lambda tokenizer: [verbalized_example(tokenizer, ex) for ex in train],
        score=lambda model, tokenizer: sentiment_outcomes(model, tokenizer, scored),
    )


@recorded
@cached  # the page's doctests share one run per rate
def run_adapters_on_validation(learning_rate: float):
    """Adapters trained on four fifths of the training reviews and scored on the other fifth
    (whole word sets held back): a rate chosen here never saw a held-out review."""
    tuning = sentiment_validation_split()
    config = replace(PRESETS.tiny, learning_rate=learning_rate)
    return run_on_tiny_model(adapter_tuning(tuning.train, tuning.heldout), config, adapter_state_dict)


def choose_learning_rate(rates: Iterable[float] = LEARNING_RATES) -> float:
    """The rate with the best validation accuracy (the lower rate on a tie)."""
    return best_learning_rate(lambda rate: run_adapters_on_validation(rate).after.value, rates)


@recorded
@cached
def run_adapters(seed: int = 0):
    """Our adapters on the tiny model at the preset's rate, scored on the held-out reviews."""
    split = sentiment_task()
    config = replace(PRESETS.tiny, seed=seed)
    return run_on_tiny_model(adapter_tuning(split.train, split.heldout), config, adapter_state_dict)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Fine-tune bottleneck adapters in a frozen causal LM to write the sentiment label after a review."
    )
    parser.add_argument(
        "--bottleneck-size",
        type=positive_int,
        default=BOTTLENECK_SIZE,
        help="d_bn, the width of every adapter's bottleneck",
    )
    add_training_arguments(parser, PRESETS)
    add_output_argument(
        parser,
        "the adapters and normalisation gains (adapters cannot be merged into the weights)",
        "load_adapters in fieldguide.parameter_efficient.adapters",
    )
    # The base only answers, frozen: in bfloat16 on a GPU; the adapters are made in float32.
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    # A 16-bit base (a real model on a GPU) trains its adapters alone: its gains stay frozen.
    train_norms = model.get_input_embeddings().weight.dtype == torch.float32
    split = sentiment_task()
    technique = adapter_tuning(split.train, split.heldout, args.bottleneck_size, train_norms)
    run = run_technique(technique, model, tokenizer, training_config(args, PRESETS), keep_model=True)
    print(run.report("sentiment accuracy"))
    print(f"{'normalisation gains':22s} {'trained' if train_norms else 'frozen (a 16-bit base)'}")
    if args.output is not None:
        save_adapters(
            run.model, args.output, args.bottleneck_size, None if args.model == TINY else args.model
        )
        tokenizer.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main_guard(main)
