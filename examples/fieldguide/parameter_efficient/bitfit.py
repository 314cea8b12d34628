"""BitFit from scratch: freeze every weight and train only the bias terms.

Ben Zaken et al. (2022) fine-tune BERT by training its bias vectors (and the new classifier)
and nothing else. Llama-family models have no biases at all, and Qwen2 has them only on the
query, key and value projections, so on today's decoders the method means one of two things:
train the biases a model has (``train_biases``), or add a bias to the layers that lack one,
starting at zero, and train that (``add_bias_terms``; PEFT calls this BEFT and names the
added vector ``beft_bias``). On a layer that has a bias the two are the same training: the
added vector is the change to the bias. Run it on the lab's sentiment task, or on a real model
with ``--model``::

    python -m fieldguide.parameter_efficient.bitfit --max-steps 300
"""

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    add_output_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    training_config,
)
from fieldguide.lab.experiment import (
    Presets,
    Technique,
    best_learning_rate,
    plot_losses,
    real_model_training,
    run_on_tiny_model,
    run_technique,
)
from fieldguide.lab.layers import merge_and_unwrap, replace_linear_layers, target_names, trained_state_dict
from fieldguide.lab.loading import parse_and_load, save_if_asked
from fieldguide.lab.metrics import sentiment_outcomes
from fieldguide.lab.records import recorded
from fieldguide.lab.stats import score
from fieldguide.lab.tasks import (
    ClassificationExample,
    sentiment_task,
    sentiment_validation_split,
    verbalized_example,
)
from fieldguide.lab.training import TrainConfig


class BiasTerm(nn.Module):
    """A frozen linear layer and a trained vector ``beft_bias`` added to its output: a bias
    for a layer that has none, or the change to the bias of one that has."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        # Zero: the layer starts as the base layer, exactly. A row, as PEFT stores it, in
        # float32 whatever the base's dtype (16-bit updates this small would round away).
        self.beft_bias = nn.Parameter(
            torch.zeros(1, base_layer.out_features, device=base_layer.weight.device)
        )
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        """Equation (eq-bitfit) of the page: ``W x + (b + beft_bias)``, with ``b = 0`` where the layer has none."""
        result = self.base_layer(x)  # (..., d_out)
        if self.merged:  # the base's bias holds the vector already
            return result
        return (result + self.beft_bias.flatten()).to(result.dtype)

    def merge(self) -> None:
        """Add the vector into the base layer's own bias; a layer without one cannot take it."""
        if self.merged:
            raise RuntimeError("this bias term is merged already; unmerge it first")
        bias = self.base_layer.bias
        if bias is None:
            raise ValueError(
                "this layer has no bias to merge into (Llama-family layers have none): "
                "keep the bias term as a layer, save it alone with bias_state_dict, "
                "or, on a Llama, call declare_llama_biases first"
            )
        bias.data = (bias.data + self.beft_bias.data.flatten()).to(bias.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the vector back out of the base layer's bias (exact up to rounding)."""
        if not self.merged:
            raise RuntimeError("this bias term is not merged")
        bias = self.base_layer.bias
        bias.data = (bias.data - self.beft_bias.data.flatten()).to(bias.dtype)
        self.merged = False


def layers_with_bias(model: nn.Module) -> list[str]:
    """The distinct last names of the linear layers that have a bias (Qwen2: q, k and v)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.bias is not None
        }
    )


def add_bias_terms(model: nn.Module, target_modules: Iterable[str] | str = "all-linear") -> nn.Module:
    """Freeze ``model`` and give every targeted linear layer a trained ``BiasTerm``, as PEFT's
    ``BeftConfig(target_modules=...)`` does."""
    model.requires_grad_(False)
    return replace_linear_layers(model, target_modules, lambda name, layer: BiasTerm(layer))


def train_biases(model: nn.Module) -> nn.Module:
    """BitFit as the paper runs it: every weight frozen, every bias the model has trained.

    Only for a float32 model; a 16-bit one (a real model on a GPU) takes ``add_bias_terms`` on
    ``layers_with_bias(model)``, whose float32 vectors train the same way.
    """
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    if not biases:
        raise ValueError(
            "this model has no bias terms to train (Llama, Mistral and Gemma models have none): "
            "add_bias_terms adds them, starting at zero"
        )
    if any(p.dtype != torch.float32 for p in biases):
        raise ValueError("train_biases needs float32 biases; on a 16-bit model use add_bias_terms")
    model.requires_grad_(False)
    for bias in biases:
        bias.requires_grad_(True)
    return model


def bias_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what trained: every ``beft_bias`` (PEFT's names less ``base_model.model.``) and
    every trained bias."""
    return trained_state_dict(model)


def as_qwen2(model: nn.Module) -> Qwen2ForCausalLM:
    """The lab's tiny Llama dressed as a Qwen2: the same weights, plus the query, key and value
    biases a Qwen2 block has, at zero (our pretraining had none to learn). It computes what the
    Llama computes; BitFit on it trains what BitFit trains on a real Qwen2."""
    llama = model.config
    if llama.model_type != "llama" or llama.attention_bias or llama.mlp_bias:
        raise ValueError(f"as_qwen2 takes a Llama without biases, not a {llama.model_type!r} model")
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    shape += ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters")
    shape += ("tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")
    config = Qwen2Config(**{name: getattr(llama, name) for name in shape})
    qwen2 = Qwen2ForCausalLM(config).to(model.device, model.dtype).eval()
    result = qwen2.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys or any(not name.endswith("_proj.bias") for name in result.missing_keys):
        raise ValueError(f"not a Llama the Qwen2 shape can hold: {result}")  # a head_dim of its own, say
    with torch.no_grad():
        for name in result.missing_keys:  # the biases Qwen2 adds; its initialisation may not zero them
            qwen2.get_parameter(name).zero_()
    return qwen2


# -- The lab's sentiment task, with BitFit -------------------------------------------------------

# Where the biases go, on the tiny model: a bias on every linear layer of every block, added
# (a Llama has none), or the three a Qwen2 block has, trained on the tiny model dressed as one.
PLACEMENTS = {
    "all-linear": lambda model, tokenizer: add_bias_terms(model, "all-linear"),
    "qwen2": lambda model, tokenizer: train_biases(as_qwen2(model)),
}
LEARNING_RATES = (1e-2, 3e-2, 1e-1, 3e-1)  # the rates the page tries, on a validation split

PRESETS = Presets(
    # 1,500 steps of 16 reviews: at LoRA's 600 the all-linear placement had not left its
    # plateau at any rate, and at 1,000 one run left it with under a hundred steps to go. The
    # rate is the one the page's search on the validation split chose for that placement (see
    # choose_learning_rate).
    tiny=TrainConfig(max_steps=1500, batch_size=16, learning_rate=3e-2),
    # A real model: IA3's real-model rate, another method that trains a vector per layer;
    # untested here.
    real=real_model_training(max_steps=300, learning_rate=3e-3),
)


def bitfit_fine_tuning(
    train: list[ClassificationExample], scored: list[ClassificationExample], prepare=PLACEMENTS["all-linear"]
) -> Technique:
    """BitFit on reviews: trained on ``train``, scored on ``scored``; ``prepare`` says which biases."""
    return Technique(
        prepare=prepare,
        data=lambda tokenizer: [verbalized_example(tokenizer, ex) for ex in train],
        score=lambda model, tokenizer: sentiment_outcomes(model, tokenizer, scored),
    )


@recorded
@cached  # the page's doctests share one run per rate and placement
def run_bitfit_on_validation(learning_rate: float, placement: str = "all-linear"):
    """BitFit trained on four fifths of the training reviews and scored on the other fifth
    (whole word sets held back): a rate chosen here never saw a held-out review."""
    tuning = sentiment_validation_split()
    config = replace(PRESETS.tiny, learning_rate=learning_rate)
    technique = bitfit_fine_tuning(tuning.train, tuning.heldout, PLACEMENTS[placement])
    return run_on_tiny_model(technique, config, bias_state_dict)


def choose_learning_rate(placement: str = "all-linear", rates: Iterable[float] = LEARNING_RATES) -> float:
    """The rate with the best validation accuracy for ``placement`` (the lower rate on a tie)."""
    return best_learning_rate(lambda rate: run_bitfit_on_validation(rate, placement).after.value, rates)


def loss_figure(ax) -> None:
    """The validation runs' loss curves: the all-linear placement at every rate tried, and
    Qwen2's at its chosen rate; the plateau, and when each left it."""
    runs = {f"all-linear, lr {rate:g}": run_bitfit_on_validation(rate) for rate in LEARNING_RATES}
    qwen2_rate = choose_learning_rate("qwen2")
    runs[f"Qwen2's q, k, v, lr {qwen2_rate:g}"] = run_bitfit_on_validation(qwen2_rate, "qwen2")
    plot_losses(ax, runs, "BitFit on sentiment (validation split)")


@recorded
@cached
def run_bitfit(placement: str = "all-linear", seed: int = 0):
    """BitFit on the tiny model at the placement's chosen rate, scored on the held-out reviews."""
    split = sentiment_task()
    config = replace(PRESETS.tiny, learning_rate=choose_learning_rate(placement), seed=seed)
    technique = bitfit_fine_tuning(split.train, split.heldout, PLACEMENTS[placement])
    return run_on_tiny_model(technique, config, bias_state_dict)


# transformers' Llama has two switches that give its projections biases, each for a group:
# attention_bias for the four of attention, mlp_bias for the three of the feed-forward network.
LLAMA_BIAS_SWITCHES = {
    "attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp_bias": ("gate_proj", "up_proj", "down_proj"),
}
LLAMA_PROJECTIONS = {name for group in LLAMA_BIAS_SWITCHES.values() for name in group}


def can_declare_biases(model: nn.Module, target_modules: Iterable[str] | str) -> bool:
    """Whether bias terms on ``target_modules`` could be merged into ``model``: every target
    has a bias already, or the model is a Llama and every target is one of its projections."""
    targets = target_names(model, target_modules)
    if targets <= set(layers_with_bias(model)):
        return True
    return model.config.model_type == "llama" and targets <= LLAMA_PROJECTIONS


def declare_llama_biases(model: nn.Module) -> nn.Module:
    """Turn on the switch of every group of a Llama's projections that carries a bias term, and
    give every layer of those groups a bias of its own at zero (the switch builds one for each):
    merged, the model saves and loads as a Llama, its trained biases kept."""
    wrapped = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, BiasTerm)
    }
    if model.config.model_type != "llama" or not wrapped <= LLAMA_PROJECTIONS:
        raise ValueError(
            "only a Llama's projections can declare biases; "
            f"this is a {model.config.model_type!r} model with bias terms on {sorted(wrapped)}"
        )
    switches = [switch for switch, group in LLAMA_BIAS_SWITCHES.items() if wrapped & set(group)]
    declared = {name for switch in switches for name in LLAMA_BIAS_SWITCHES[switch]}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in declared and isinstance(module, (BiasTerm, nn.Linear)):
            layer = module.base_layer if isinstance(module, BiasTerm) else module
            if layer.bias is None:
                zeros = torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device)
                layer.bias = nn.Parameter(zeros, requires_grad=False)
    for switch in switches:
        setattr(model.config, switch, True)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Add every vector into its layer's own bias and put the base layer back: a plain model.
    A Llama first declares biases for the groups of projections that carry bias terms. Into a
    16-bit bias the sum rounds, as any 16-bit update does: score the merged model."""
    if any(module.base_layer.bias is None for module in model.modules() if isinstance(module, BiasTerm)):
        declare_llama_biases(model)  # refuses any other model: its layers cannot hold a bias
    return merge_and_unwrap(model, BiasTerm)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Fine-tune the bias terms of a causal LM to write the sentiment label after a review."
    )
    parser.add_argument(
        "--biases",
        choices=("auto", "own", "all-linear"),
        default="auto",
        help="train the model's own biases (own), add one to every linear layer (all-linear), "
        "or own where the model has any and all-linear where it has none (auto)",
    )
    add_training_arguments(parser, PRESETS)
    add_output_argument(parser, "the model with the trained biases merged into its own")
    # The base only answers, frozen: in bfloat16 on a GPU; the bias terms are made in float32.
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    own = layers_with_bias(model)
    if args.biases == "own" and not own:
        parser.error("argument --biases: own, but this model has no biases; use all-linear to add some")
    targets = own if args.biases == "own" or (args.biases == "auto" and own) else "all-linear"
    if args.output is not None and not can_declare_biases(model, targets):
        parser.error(  # checked before training, not after
            f"argument --output: a {model.config.model_type!r} model cannot hold biases on all its linear layers; "
            "train the model's own biases (--biases own) to save a merged model"
        )
    where = (
        "added to every linear layer"
        if targets == "all-linear"
        else "the model's own, on " + ", ".join(targets)
    )
    print(f"{'bias terms':22s} {where}")
    split = sentiment_task()
    prepare = lambda model, tokenizer: add_bias_terms(model, targets)
    technique = bitfit_fine_tuning(split.train, split.heldout, prepare)
    run = run_technique(technique, model, tokenizer, training_config(args, PRESETS), keep_model=True)
    print(run.report("sentiment accuracy"))
    if args.output is not None:
        merged = merge_and_unload(run.model)  # rounds into a bfloat16 base: score what is saved
        print(f"{'after merging':22s} {score(technique.score(merged, tokenizer))}")
        save_if_asked(args.output, merged, tokenizer)


if __name__ == "__main__":
    main_guard(main)
