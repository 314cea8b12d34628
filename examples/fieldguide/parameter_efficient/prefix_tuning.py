"""Prefix tuning from scratch: trained keys and values in front of every layer's attention.

Li and Liang (2021) go one step deeper than a soft prompt. A prompt is input, read once at
the bottom of the model; a prefix is what every attention layer reads: for each of
``num_virtual_tokens`` positions, a key and a value in every layer, as if the model had read
some text before the input and kept it in its key-value cache. Only the prefix trains:
``num_virtual_tokens`` times ``2 * num_layers * d_kv`` numbers, where ``d_kv`` is the width of
a layer's keys. The prefix goes in through that same cache, as PEFT's does, and the names are
PEFT's (``prompt_encoder``, ``embedding``, ``transform``, ``prefix_projection``,
``get_prompt``, ``prompt_embeddings``), so a prefix saved here loads into PEFT. Run it on the
lab's sentiment task, or on a real model with ``--model``::

    python -m fieldguide.parameter_efficient.prefix_tuning --max-steps 300
"""

import inspect
import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache

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
    plot_losses,
    real_model_training,
    run_on_tiny_model,
    run_technique,
)
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


def key_value_shape(config) -> tuple[int, int, int]:
    """(layers, key-value heads, head width) of a decoder: what one layer's cache holds per position."""
    # Grouped-query attention keeps fewer key-value heads than query heads; without it, as many.
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


class PrefixEncoder(nn.Module):
    """The prefix itself (PEFT's ``PrefixEncoder``): one row per virtual token, holding its key
    and its value for every layer, ``2 * num_layers * kv_dim`` numbers.

    With ``encoder_hidden_size`` set, the rows are not trained directly: a two-layer network
    makes them from shorter trained vectors (Li and Liang's reparametrization, PEFT's
    ``prefix_projection``). Either way the prefix after training is just the rows."""

    def __init__(
        self, num_virtual_tokens: int, num_layers: int, kv_dim: int, encoder_hidden_size: int | None = None
    ) -> None:
        super().__init__()
        row = num_layers * 2 * kv_dim
        self.prefix_projection = encoder_hidden_size is not None
        # nn.Embedding's own start, N(0, 1) per entry, and nn.Linear's: PEFT's default start.
        if self.prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, encoder_hidden_size), nn.Tanh(), nn.Linear(encoder_hidden_size, row)
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, row)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, n, 2 * layers * kv_dim)
        """The rows of the virtual tokens ``indices``."""
        rows = self.embedding(indices)
        return self.transform(rows) if self.prefix_projection else rows


# Why every way of asking for gradient checkpointing is refused (the page shows what happens otherwise).
NO_CHECKPOINTING = (
    "prefix tuning cannot train with gradient checkpointing: transformers drops the key-value cache, "
    "and with it the prefix, in every layer it recomputes"
)


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes a key-value cache: ``cache`` since
    transformers 5.24 (the old ``past_key_values`` still works, with a warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixTuningModel(nn.Module):
    """A frozen causal LM whose every attention layer reads a trained prefix of keys and
    values before the input: equation (eq-prefix-tuning)."""

    def __init__(self, base_model: nn.Module, prompt_encoder: PrefixEncoder, num_virtual_tokens: int) -> None:
        super().__init__()
        self.base_model = base_model.requires_grad_(False)
        self.prompt_encoder = prompt_encoder
        self.num_virtual_tokens = num_virtual_tokens
        # The virtual tokens' indices 0 .. n-1, on the base's device (a GPU's embedding cannot
        # look up indices that sit on the CPU); not a parameter and not saved.
        device = base_model.get_input_embeddings().weight.device
        self.register_buffer(
            "prompt_tokens", torch.arange(num_virtual_tokens, device=device), persistent=False
        )
        self.cache_keyword = cache_keyword(base_model)

    @property
    def config(self):  # what the lab's loops read (the pad token) is the base model's
        return self.base_model.config

    def get_prompt(self, batch_size: int) -> DynamicCache:
        """The prefix as the key-value cache the base model reads: per layer, keys and values of
        shape (B, kv heads, n, head_dim), made once and shared by every row of the batch."""
        layers, heads, head_dim = key_value_shape(self.config)
        n = self.num_virtual_tokens
        rows = self.prompt_encoder(self.prompt_tokens.unsqueeze(0))  # (1, n, 2 * layers * heads * head_dim)
        dtype = self.base_model.get_input_embeddings().weight.dtype
        # PEFT's layout of a row: layer 0's key, layer 0's value, layer 1's key, ...; each head after head.
        prefix = rows.to(dtype).view(1, n, 2 * layers, heads, head_dim).permute(2, 0, 3, 1, 4)
        prefix = prefix.expand(-1, batch_size, -1, -1, -1)  # (2 * layers, B, heads, n, head_dim)
        cache = DynamicCache()
        for layer in range(layers):
            cache.update(prefix[2 * layer], prefix[2 * layer + 1], layer)
        return cache

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """The base model's output for ``input_ids`` read after the prefix: logits for the input's
        T positions only (the prefix is in the cache, not in the input)."""
        if kwargs.get("position_ids") is not None:  # packed rows restart their positions; a prefix cannot
            raise ValueError("a prefix cannot be combined with position_ids (packed rows): pad instead")
        kwargs.pop("position_ids", None)
        if self.training and torch.is_grad_enabled() and checkpointing(self.base_model):
            # transformers drops the cache in a layer it recomputes, prefix included (see the page).
            raise ValueError(NO_CHECKPOINTING)
        batch_size = input_ids.shape[0]
        if attention_mask is not None:  # every input token may read every position of the prefix
            prefix_mask = attention_mask.new_ones(batch_size, self.num_virtual_tokens)
            attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        # With a cache of n positions, the base model numbers the input's positions from n.
        kwargs[self.cache_keyword] = self.get_prompt(batch_size)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Refused: the lab's loop asks for checkpointing through this method (see ``forward``)."""
        raise ValueError(NO_CHECKPOINTING)


def checkpointing(model: nn.Module) -> bool:
    """Whether any layer of ``model`` recomputes its activations in the backward pass."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@torch.no_grad()
def prefix_from_text(model: nn.Module, tokenizer, text: str, num_virtual_tokens: int) -> torch.Tensor:
    """Li and Liang's start from real words: the keys and values ``model`` computes for
    ``text``'s tokens (repeated or cut to ``num_virtual_tokens``), as PEFT-layout rows (n, 2 * layers * kv_dim).

    A prefix started here is the model having read the text: the same cache, so the same logits
    after it (up to float32 rounding in another order)."""
    ids = tokenizer(text)["input_ids"]
    ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
    device = model.get_input_embeddings().weight.device
    cache = DynamicCache()
    model(torch.tensor([ids], device=device), use_cache=True, **{cache_keyword(model): cache})
    columns = []
    for layer in cache.layers:  # keys and values: (1, heads, n, head_dim) -> (n, heads * head_dim)
        columns += [layer.keys[0].transpose(0, 1).flatten(1), layer.values[0].transpose(0, 1).flatten(1)]
    return torch.cat(columns, dim=1).float()  # kept in float32 whatever the base's dtype


def add_prefix_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    tokenizer=None,
    init_text: str | None = None,
    encoder_hidden_size: int | None = None,
) -> PrefixTuningModel:
    """Freeze ``model`` and give every attention layer a trained prefix, as PEFT's
    ``PrefixTuningConfig`` does: at random, or started from ``init_text``'s keys and values;
    made by a two-layer network from shorter vectors if ``encoder_hidden_size`` is given."""
    if init_text is not None and encoder_hidden_size is not None:
        raise ValueError("a prefix made by a network (encoder_hidden_size) cannot start from text")
    if checkpointing(model):
        raise ValueError(NO_CHECKPOINTING + "; turn it off before adding the prefix")
    layers, heads, head_dim = key_value_shape(model.config)
    encoder = PrefixEncoder(num_virtual_tokens, layers, heads * head_dim, encoder_hidden_size)
    if init_text is not None:
        encoder.embedding.weight.data.copy_(prefix_from_text(model, tokenizer, init_text, num_virtual_tokens))
    encoder.to(model.get_input_embeddings().weight.device)
    return PrefixTuningModel(model, encoder, num_virtual_tokens)


def prefix_tuning_state_dict(model: PrefixTuningModel) -> dict[str, torch.Tensor]:
    """Only the prefix, as PEFT saves it: the rows (the network's output, if there is one)
    under the key ``prompt_embeddings``."""
    with torch.no_grad():
        rows = model.prompt_encoder(model.prompt_tokens.unsqueeze(0))[0]  # (n, 2 * layers * kv_dim)
    return {"prompt_embeddings": rows.detach().clone()}


def save_prefix(model: PrefixTuningModel, directory: Path, base_name: str | None) -> None:
    """Save the prefix as a PEFT adapter: ``PeftModel.from_pretrained(base, directory)`` loads
    it. ``base_name`` is the base model's Hub id or directory (None for the lab's tiny model)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(prefix_tuning_state_dict(model), directory / "adapter_model.safetensors")
    layers, heads, head_dim = key_value_shape(model.config)
    peft_config = {  # what PEFT's PrefixTuningConfig reads back; the rows are stored already made
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": heads * head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        "prefix_projection": False,  # the network, if any, is not needed after training
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")


# -- The lab's sentiment task, with a prefix ---------------------------------------------------

NUM_VIRTUAL_TOKENS = 20  # the prompt tuning page's length, for a like-for-like comparison
# The rates the page tries, on a validation split of the training reviews.
LEARNING_RATES = (3e-3, 1e-2, 3e-2, 1e-1)
ENCODER_HIDDEN_SIZE = 64  # the reparametrizing network's width: PEFT's default, the key width

PRESETS = Presets(
    # 1,500 steps of 16, as prompt tuning's: at 600 no rate had left the plateau at chance. The
    # rate is the one the page's search on the validation split chose (see choose_learning_rate).
    tiny=TrainConfig(max_steps=1500, batch_size=16, learning_rate=1e-1),
    # A real model: untested here, a starting point to tune. Prompt tuning's real-model rate, a
    # tenth of the tiny model's, and no gradient checkpointing, which a prefix put in through
    # the key-value cache cannot use.
    real=replace(real_model_training(max_steps=1000, learning_rate=1e-2), gradient_checkpointing=False),
)


def prefix_tuning(
    train: list[ClassificationExample],
    scored: list[ClassificationExample],
    num_virtual_tokens: int = NUM_VIRTUAL_TOKENS,
    init_text: str | None = None,
    encoder_hidden_size: int | None = None,
) -> Technique:
    """Prefix tuning on reviews: trained on ``train``, scored on ``scored``; PEFT's random start
    unless ``init_text`` or ``encoder_hidden_size`` is given (see ``add_prefix_tuning``)."""
    return Technique(
        prepare=lambda model, tokenizer: add_prefix_tuning(
            model, num_virtual_tokens, tokenizer, init_text, encoder_hidden_size
        ),
        data=lambda tokenizer: [verbalized_example(tokenizer, ex) for ex in train],
        score=lambda model, tokenizer: sentiment_outcomes(model, tokenizer, scored),
    )


@recorded
@cached  # the page's doctests share one run per setting
def run_prefix_tuning_on_validation(
    learning_rate: float, init_text: str | None = None, encoder_hidden_size: int | None = None
):
    """Prefix tuning on four fifths of the training reviews, scored on the other fifth (whole
    word sets held back): a choice made here never saw a held-out review."""
    tuning = sentiment_validation_split()
    config = replace(PRESETS.tiny, learning_rate=learning_rate)
    technique = prefix_tuning(
        tuning.train, tuning.heldout, NUM_VIRTUAL_TOKENS, init_text, encoder_hidden_size
    )
    return run_on_tiny_model(technique, config, prefix_tuning_state_dict)


def choose_learning_rate(rates: Iterable[float] = LEARNING_RATES) -> float:
    """The rate with the best validation accuracy (the lower rate on a tie)."""
    return best_learning_rate(lambda rate: run_prefix_tuning_on_validation(rate).after.value, rates)


def loss_figure(ax) -> None:
    """The validation runs' loss curves, one per learning rate."""
    runs = {f"lr {rate:g}": run_prefix_tuning_on_validation(rate) for rate in LEARNING_RATES}
    plot_losses(ax, runs, "Prefix tuning on sentiment, four learning rates")


@recorded
@cached
def run_prefix_tuning(seed: int = 0):
    """Our prefix tuning on the tiny model at the preset's rate, scored on the held-out reviews."""
    split = sentiment_task()
    config = replace(PRESETS.tiny, seed=seed)
    return run_on_tiny_model(prefix_tuning(split.train, split.heldout), config, prefix_tuning_state_dict)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Fine-tune a prefix of keys and values for a frozen causal LM to write the sentiment label after a review."
    )
    parser.add_argument(
        "--num-virtual-tokens", type=positive_int, default=NUM_VIRTUAL_TOKENS, help="length of the prefix"
    )
    add_training_arguments(parser, PRESETS)
    add_output_argument(
        parser,
        "the prefix, as a PEFT adapter (a prefix cannot be merged into the weights)",
        "PEFT's PeftModel.from_pretrained",
    )
    if parser.parse_args(argv).gradient_checkpointing:  # refused before a model is loaded
        parser.error("argument --gradient-checkpointing: prefix tuning cannot train with it (see the page)")
    # The base only answers, frozen: in bfloat16 on a GPU; the prefix is made in float32.
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    config = training_config(args, PRESETS)
    split = sentiment_task()
    technique = prefix_tuning(split.train, split.heldout, args.num_virtual_tokens)
    run = run_technique(technique, model, tokenizer, config, keep_model=True)
    print(run.report("sentiment accuracy"))
    if args.output is not None:
        save_prefix(run.model, args.output, None if args.model == TINY else args.model)
        tokenizer.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main_guard(main)
