"""LoRA from scratch: a frozen linear layer plus a trainable low-rank update.

Hu et al. (2022) freeze a pretrained weight ``W`` (d_out x d_in) and learn its change as a
product of two thin matrices, ``delta W = B A`` with ``A`` (r x d_in) and ``B`` (d_out x r),
scaled by ``lora_alpha / r``. Only ``A`` and ``B`` train: r (d_in + d_out) numbers per layer
instead of d_in d_out. The names below are PEFT's (``base_layer``, ``lora_A``, ``lora_B``,
``r``, ``lora_alpha``, ``scaling``, ``merge``, ``unmerge``, ``get_delta_weight``), so a reader
who moves on to PEFT's source recognises every one of them.

Run it on the lab's sentiment task, or on a real model with ``--model``::

    python -m fieldguide.parameter_efficient.lora --lora-r 8 --lora-alpha 16
"""

import copy
import math
from collections.abc import Iterable
from dataclasses import replace

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from torch import nn

from fieldguide.lab.cache import cached
from fieldguide.lab.chat import encode_instructions
from fieldguide.lab.cli import (
    add_output_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    positive_float,
    positive_int,
    training_config,
)
from fieldguide.lab.data import pad_batch
from fieldguide.lab.experiment import (
    Presets,
    Technique,
    real_model_training,
    run_on_tiny_model,
    run_technique,
)
from fieldguide.lab.layers import merge_and_unwrap, replace_linear_layers
from fieldguide.lab.loading import load_model, parse_and_load, save_if_asked
from fieldguide.lab.metrics import exact_match_outcomes, sentiment_outcomes
from fieldguide.lab.records import recorded
from fieldguide.lab.stats import score
from fieldguide.lab.tasks import instruction_task, sentiment_task, verbalized_example
from fieldguide.lab.training import TrainConfig, causal_lm_loss, seed_everything


class LoraLinear(nn.Module):
    """``base_layer(x) + scaling * lora_B(lora_A(dropout(x)))``, with ``base_layer`` frozen."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"the rank r must be a positive integer, got {r}")
        self.base_layer = base_layer.requires_grad_(False)  # W stays as pretrained
        self.r, self.lora_alpha = r, lora_alpha
        # Hu et al. divide by r so that changing r needs less retuning of the rest; with
        # 1 / r, though, larger ranks learn more slowly, and rsLoRA's 1 / sqrt(r) keeps the
        # update's activations and gradients of the same order for any r (Kalajdzievski 2023).
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # A and B live beside W but in float32 whatever W's precision: a base frozen in
        # bfloat16 halves its memory, and the few trained numbers keep full precision.
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device)  # (r, d_in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device)  # (d_out, r)
        self.reset_lora_parameters()
        self.merged = False

    def reset_lora_parameters(self) -> None:
        # A random, B zero: delta W = B A = 0, so training starts exactly at the base model, and
        # B still gets a gradient on the first step because A is not zero. PEFT draws A as
        # nn.Linear draws its own weights (Kaiming-uniform with a = sqrt(5)).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def get_delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B A`` that merging adds to ``W``: (d_out, d_in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        """Fold the update into ``W``: the layer becomes one matmul again, at no extra cost."""
        if self.merged:
            raise RuntimeError("this LoRA layer is merged already; unmerge it first")
        if not isinstance(self.base_layer, nn.Linear):  # a 4-bit base's weight is bytes of indices
            raise TypeError(
                f"cannot merge into a {type(self.base_layer).__name__}; merge into a dequantized copy "
                "(fieldguide.parameter_efficient.qlora.dequantize_linears)"
            )
        weight = self.base_layer.weight
        weight.data += self.get_delta_weight().to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out of ``W``, restoring the base weight (up to rounding)."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged")
        weight = self.base_layer.weight
        weight.data -= self.get_delta_weight().to(weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        """Equation (eq-lora) of the page: the frozen layer's output plus the scaled update."""
        result = self.base_layer(x)  # (..., d_out)
        if self.merged:  # W already holds the update; adding it again would count it twice
            return result
        x = x.to(self.lora_A.weight.dtype)  # a bfloat16 base hands A bfloat16 activations
        # The scale multiplies the r numbers per token between A and B, not the d_out numbers
        # after B as PEFT does: the same update, in less time (the page's benchmark measures it).
        # With a scale that is a power of two, as alpha = 2r gives, it even rounds the same.
        update = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)  # (..., d_out)
        return result + update.to(result.dtype)


def add_lora(
    model: nn.Module,
    target_modules: Iterable[str] | str = "all-linear",
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    layer_class: type[LoraLinear] = LoraLinear,
) -> nn.Module:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name ends in a target in ``LoraLinear``.

    ``target_modules`` holds the last part of module names, as PEFT's ``LoraConfig`` takes
    them: ``["q_proj", "v_proj"]`` adapts the query and value projections of every layer.
    ``"all-linear"``, as in PEFT, adapts every linear layer but the output layer.
    ``layer_class`` is a variant of ``LoraLinear`` to wrap them in instead (DoRA's).
    """
    model.requires_grad_(False)  # everything but the new A and B stays as pretrained
    return replace_linear_layers(
        model, target_modules, lambda name, layer: layer_class(layer, r, lora_alpha, lora_dropout, use_rslora)
    )


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [module for module in model.modules() if isinstance(module, LoraLinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: what a LoRA checkpoint holds, the A and B of every LoRA layer (and
    whatever else a variant trains there, named ``lora_...`` as in PEFT: DoRA's magnitudes)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_" in name}


def from_peft_state_dict(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT adapter's weights under our names: PEFT wraps the model as ``base_model.model``."""
    return {name.removeprefix("base_model.model."): tensor for name, tensor in adapter.items()}


def to_peft_state_dict(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter under PEFT's names, for ``set_peft_model_state_dict``."""
    return {f"base_model.model.{name}": tensor for name, tensor in adapter.items()}


def load_adapter(model: nn.Module, adapter: dict[str, torch.Tensor]) -> nn.Module:
    """Copy an adapter's A and B into ``model``'s LoRA layers: switching adapters on one base.

    Only the adapter's numbers move (about 150 kilobytes for the tiny model); the base stays
    where it is. An adapter for another model, rank or set of layers is refused, by its names
    or its shapes. Its scale is not in its tensors: load it into layers made with the same
    ``lora_alpha`` (and ``use_rslora``) it was trained with, as PEFT reads them from the
    adapter's ``adapter_config.json``.
    """
    if merged := [layer for layer in lora_layers(model) if layer.merged]:
        # Unmerging later would subtract the new adapter's update from a weight that holds the old one.
        raise RuntimeError(
            f"{len(merged)} LoRA layers are merged; unmerge them before loading another adapter"
        )
    expected = lora_state_dict(model)
    if adapter.keys() != expected.keys():
        raise ValueError(
            f"the adapter's weights do not match this model's LoRA layers: {len(adapter)} tensors "
            f"against {len(expected)}, e.g. {sorted(adapter.keys() ^ expected.keys())[:1]}"
        )
    for name, tensor in adapter.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{name} is {tuple(tensor.shape)} in the adapter, {tuple(expected[name].shape)} here"
            )
    with torch.no_grad():
        for name, tensor in adapter.items():
            expected[name].copy_(tensor)  # state_dict tensors share storage with the parameters
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put its base layer back: a plain model, as fast as the base."""
    return merge_and_unwrap(model, LoraLinear)


# -- The lab's sentiment task, with LoRA ---------------------------------------------------------

PRESETS = Presets(
    # The evaluation page's ranking, to the letter: 600 steps of 16 reviews at 3e-3, three
    # times the rate full fine-tuning uses on the same task. Only A and B move, and B starts
    # at zero, so LoRA takes larger steps to change the model as much.
    tiny=TrainConfig(max_steps=600, batch_size=16, learning_rate=3e-3),
    # A real model: the usual preset at 2e-4, ten times full fine-tuning's rate (see the page).
    real=real_model_training(max_steps=300, learning_rate=2e-4),
)


def lora_fine_tuning(
    r: int = 8,
    lora_alpha: float = 16,
    target_modules="all-linear",
    use_rslora: bool = False,
    layer_class: type[LoraLinear] = LoraLinear,
) -> Technique:
    """LoRA (or a variant's ``layer_class``) on the sentiment task: the review's prompt, the
    label word as the only target."""
    split = sentiment_task()
    return Technique(
        prepare=lambda model, tokenizer: add_lora(
            model, target_modules, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, layer_class=layer_class
        ),
        data=lambda tokenizer: [verbalized_example(tokenizer, ex) for ex in split.train],
        score=lambda model, tokenizer: sentiment_outcomes(model, tokenizer, split.heldout),
    )


@recorded
@cached  # the page's doctests share one run per setting
def run_lora(
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: tuple[str, ...] | str = "all-linear",
    use_rslora: bool = False,
    seed: int = 0,
    max_steps: int | None = None,
):
    """Our LoRA on the tiny model, trained with the tiny preset (for ``max_steps`` steps, if
    given: another page's budget, to compare with it at equal length)."""
    technique = lora_fine_tuning(r, lora_alpha, target_modules, use_rslora)
    config = replace(PRESETS.tiny, seed=seed, max_steps=max_steps or PRESETS.tiny.max_steps)
    return run_on_tiny_model(technique, config, lora_state_dict)


# -- What r and alpha do -----------------------------------------------------------------------

RANKS = (1, 2, 4, 8, 16, 32, 64)


def loss_drop_after_one_step(
    base: nn.Module, batch: dict, r: int, lora_alpha: float, use_rslora: bool = False
) -> float:
    """How far the first AdamW step of a new LoRA moves the model: the loss on ``batch`` before
    the step minus the loss after it, at the tiny preset's learning rate."""
    seed_everything(0)  # the same seed for every setting (the same A wherever the shapes agree)
    model = add_lora(copy.deepcopy(base), r=r, lora_alpha=lora_alpha, use_rslora=use_rslora).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=PRESETS.tiny.learning_rate
    )

    def mean_loss() -> torch.Tensor:
        loss_sum, targets = causal_lm_loss(model, batch)
        return loss_sum / targets

    before = mean_loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        return before.item() - mean_loss().item()


def first_step_sweep(
    ranks: Iterable[int] = RANKS, alphas: Iterable[float] = (16,), use_rslora: bool = False
) -> dict[tuple[int, float], float]:
    """``loss_drop_after_one_step`` for every (r, alpha), on the same 64 training reviews."""
    base, tokenizer = load_model("tiny")
    reviews = sentiment_task().train[:64]
    batch = pad_batch([verbalized_example(tokenizer, ex) for ex in reviews], tokenizer.pad_token_id)
    return {
        (r, alpha): loss_drop_after_one_step(base, batch, r, alpha, use_rslora)
        for r in ranks
        for alpha in alphas
    }


def rank_figure(ax) -> None:
    """The first step's loss drop against r, with alpha / r and with rsLoRA's alpha / sqrt(r)."""
    # rsLoRA's alpha is chosen so that both scalings agree at r = 8, the page's usual rank.
    for label, drops in [
        ("\u03b1 / r, \u03b1 = 16", first_step_sweep(alphas=(16,))),
        (
            "\u03b1 / \u221ar, \u03b1 = 16 / \u221a8",
            first_step_sweep(alphas=(16 / math.sqrt(8),), use_rslora=True),
        ),
    ]:
        ax.plot(RANKS, list(drops.values()), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(RANKS, [str(r) for r in RANKS])
    ax.set_xlabel("rank r")
    ax.set_ylabel("loss drop after one step (nats)")
    ax.set_ylim(bottom=0)
    ax.legend()


# -- Several adapters on one base ---------------------------------------------------------------
#
# A LoRA fine-tune changes only its A and B, so one copy of the base in memory can serve many
# fine-tunes: switching means copying a few kilobytes of A and B, and PEFT can even give each
# row of one batch its own adapter. The page trains a second adapter, for instructions, beside
# the review one, and serves both from one base.

# The tutorial's 400 steps of 32 chats, at five times its full fine-tuning rate (2e-3): in short
# trial runs 3e-3 reached an exact match of 0.31 in those steps, 1e-2 reached 0.43.
INSTRUCTION_PRESET = TrainConfig(max_steps=400, batch_size=32, learning_rate=1e-2, warmup_steps=30)


def instruction_lora(r: int = 8, lora_alpha: float = 16) -> Technique:
    """Our LoRA on the instruction task's chats, scored by exact match on its held-out prompts."""
    return Technique(
        prepare=lambda model, tokenizer: add_lora(model, "all-linear", r=r, lora_alpha=lora_alpha),
        data=lambda tokenizer: encode_instructions(tokenizer, instruction_task().train),
        score=lambda model, tokenizer: exact_match_outcomes(model, tokenizer, instruction_task().heldout),
    )


@recorded
@cached  # the page's doctests and the merging page share the one run
def run_instruction_lora():
    """An instruction adapter on the tiny model: rank 8 on every linear layer, as the review one."""
    return run_on_tiny_model(instruction_lora(), INSTRUCTION_PRESET, lora_state_dict)


def peft_model_with(base: torch.nn.Module, adapters: dict, r: int = 8, lora_alpha: float = 16) -> PeftModel:
    """One PEFT model over ``base`` holding every adapter of ``adapters`` (name -> our tensors)."""
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules="all-linear")
    names = list(adapters)
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    for name, adapter in adapters.items():
        result = set_peft_model_state_dict(model, to_peft_state_dict(adapter), adapter_name=name)
        if result.unexpected_keys:  # a name PEFT did not place: the adapter would silently be zero
            raise ValueError(f"PEFT did not use {result.unexpected_keys[:1]} of adapter {name!r}")
    return model.eval()


def add_lora_arguments(parser) -> None:
    """``--lora-r`` and ``--lora-alpha``, as every LoRA-based command line takes them."""
    parser.add_argument("--lora-r", type=positive_int, default=8, help="the rank r of every update")
    parser.add_argument(
        "--lora-alpha", type=positive_float, default=16, help="the update is scaled by alpha / r"
    )


def main(
    argv: list[str] | None = None, layer_class: type[LoraLinear] = LoraLinear, name: str = "LoRA"
) -> None:
    """The command line, for LoRA and for its variants (DoRA's passes its ``layer_class``)."""
    parser = example_parser(
        f"Fine-tune a causal LM with our {name} to write the sentiment label after a review."
    )
    add_lora_arguments(parser)
    parser.add_argument(
        "--use-rslora", action="store_true", help="scale the update by alpha / sqrt(r), as rsLoRA does"
    )
    add_training_arguments(parser, PRESETS)
    add_output_argument(parser, "the model with the update merged into its weights")
    # The base only answers, frozen: loaded as a model that is not trained, in bfloat16 on a
    # GPU (half the memory of float32), while A and B are made in float32.
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    technique = lora_fine_tuning(
        args.lora_r, args.lora_alpha, use_rslora=args.use_rslora, layer_class=layer_class
    )
    run = run_technique(technique, model, tokenizer, training_config(args, PRESETS), keep_model=True)
    print(run.report("sentiment accuracy"))
    print(f"{'adapter':22s} {run.trainable_parameters:,} of {run.total_parameters:,} parameters trained")
    if args.output is not None:
        # Merging into a bfloat16 base rounds the update: score what is saved, not what trained.
        merged = merge_and_unload(run.model)
        print(f"{'after merging':22s} {score(technique.score(merged, tokenizer))}")
        save_if_asked(args.output, merged, tokenizer)


if __name__ == "__main__":
    main_guard(main)
