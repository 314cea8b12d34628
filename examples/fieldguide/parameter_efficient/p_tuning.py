"""P-tuning from scratch: a soft prompt made by a small network instead of trained directly.

Liu et al. (2021) put trained vectors into the input, as prompt tuning does, but do not train
the vectors themselves: a *prompt encoder*, a small network, turns a table of free vectors into
the prompt, and both train together. Their encoder was a bidirectional LSTM followed by a
two-layer MLP; PEFT offers that (``"LSTM"``) and a three-layer MLP (``"MLP"``, its default).
Once trained, only the encoder's output is kept: the network is dropped, and the prompt costs
what prompt tuning's does. The names are PEFT's (``PromptEncoder``, ``embedding``,
``mlp_head``, ``lstm_head``, ``encoder_hidden_size``), so a prompt saved here loads into PEFT.
Run it on the lab's sentiment task, or on a real model with ``--model``::

    python -m fieldguide.parameter_efficient.p_tuning --max-steps 300
"""

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
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
from fieldguide.parameter_efficient.prompt_tuning import (
    INIT_TEXT,
    PromptTuningModel,
    prompt_tuning_state_dict,
    text_init,
)

ENCODER_TYPES = ("MLP", "LSTM")


class PromptEncoder(nn.Module):
    """The virtual tokens' vectors, made by a network from a table of free vectors (PEFT's
    ``PromptEncoder``): equation (eq-p-tuning)."""

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        encoder_hidden_size: int | None = None,
        encoder_type: str = "MLP",
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, not {encoder_type!r}")
        hidden = encoder_hidden_size or token_dim  # PEFT's default: the model's width
        self.encoder_type, self.hidden_size = encoder_type, hidden
        # The network's input: one free vector per virtual token, N(0, 1) as nn.Embedding starts.
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if encoder_type == "LSTM":
            # Read in both directions, so each vector is made knowing all the others.
            self.lstm_head = nn.LSTM(
                token_dim,
                hidden,
                num_layers=encoder_num_layers,
                dropout=encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim)
            )
        else:  # each vector made on its own, by the same three layers
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, token_dim),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, n, d)
        """The vectors of the virtual tokens ``indices``."""
        free = self.embedding(indices)
        if self.encoder_type == "LSTM":
            free = self.lstm_head(free)[0]  # (B, n, 2h): both directions side by side
        return self.mlp_head(free)


def fit_prompt_encoder(
    encoder: PromptEncoder, target: torch.Tensor, steps: int = 1000, lr: float = 1e-3
) -> float:
    """Train ``encoder`` alone until the prompt it makes is ``target`` (n, d), by least squares:
    how P-tuning starts from the embeddings of words. Returns the largest error left."""
    indices = torch.arange(target.shape[0], device=target.device).unsqueeze(0)  # (1, n)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    for _ in range(steps):
        error = encoder(indices)[0] - target  # (n, d)
        optimizer.zero_grad()
        (error**2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        return (encoder(indices)[0] - target).abs().max().item()


def add_p_tuning(
    model: nn.Module,
    num_virtual_tokens: int,
    encoder_hidden_size: int | None = None,
    encoder_type: str = "MLP",
    tokenizer=None,
    init_text: str | None = None,
) -> PromptTuningModel:
    """Freeze ``model`` and put a prompt made by a prompt encoder in front of it, as PEFT's
    ``PromptEncoderConfig`` does: the encoder at random, or (given ``init_text``) fitted to
    make the embeddings of the text's tokens, prompt tuning's "TEXT" start. The model around
    the prompt is prompt tuning's."""
    embeddings = model.get_input_embeddings()
    encoder = PromptEncoder(num_virtual_tokens, embeddings.embedding_dim, encoder_hidden_size, encoder_type)
    encoder = encoder.to(embeddings.weight.device)
    if init_text is not None:
        target = text_init(model, tokenizer, init_text, num_virtual_tokens)
        error = fit_prompt_encoder(encoder, target)
        if error > 0.1 * target.abs().max().item():  # training would start far from the text
            raise RuntimeError(
                f"the prompt encoder did not fit the text's embeddings (largest error {error:.3g} "
                f"against entries up to {target.abs().max().item():.3g}): try a wider encoder"
            )
    return PromptTuningModel(model, encoder, num_virtual_tokens)


def p_tuning_parameters(num_virtual_tokens: int, d_model: int, hidden: int, encoder_type: str = "MLP") -> int:
    """The numbers P-tuning trains, with ``hidden`` the encoder's width: equation
    (eq-p-tuning-mlp-parameters) or (eq-p-tuning-lstm-parameters)."""
    n, d, h = num_virtual_tokens, d_model, hidden
    if encoder_type == "MLP":  # the table, then d -> h -> h -> d, each layer with its bias
        return n * d + 2 * d * h + h * h + 2 * h + d
    # Each LSTM layer and direction has four gates, each with input weights, recurrent weights
    # and two biases (PyTorch keeps b_ih and b_hh apart): 8hd + 8h^2 + 16h for the first layer's
    # two directions, 24h^2 + 16h for the second's, which reads 2h. Then 2h -> 2h -> d.
    return n * d + 10 * h * d + 36 * h * h + 34 * h + d


def save_p_tuning(model: PromptTuningModel, directory: Path, base_name: str | None) -> None:
    """Save the prompt the encoder makes, as PEFT saves a P-tuning adapter: the vectors alone
    under ``prompt_embeddings``, the network dropped. ``PeftModel.from_pretrained`` loads it."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(prompt_tuning_state_dict(model), directory / "adapter_model.safetensors")
    config, encoder = model.base_model.config, model.prompt_encoder
    peft_config = {  # the fields PEFT's PromptEncoderConfig reads back
        "peft_type": "P_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": config.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "encoder_reparameterization_type": encoder.encoder_type,
        "encoder_hidden_size": encoder.hidden_size,
        "inference_mode": True,  # PEFT then reads the saved vectors as the prompt, with no network
    }
    (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")


# -- The lab's sentiment task, with P-tuning ----------------------------------------------------

NUM_VIRTUAL_TOKENS = 20  # prompt tuning's length and start, so the two pages compare like with like
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)  # the rates the page tries, on a validation split

PRESETS = Presets(
    # Twice prompt tuning's 1,500 steps of 16 reviews: P-tuning sits longer on the plateau at
    # chance (the page's loss curves show runs leaving it after step 1,500). The rate is the
    # one the page's search on the validation split chose.
    tiny=TrainConfig(max_steps=3000, batch_size=16, learning_rate=3e-3),
    # A real model: untested here. A third of the tiny model's rate, since a wider encoder moves
    # the prompt further at each step; a starting point to search from, not a tuned value.
    real=real_model_training(max_steps=1000, learning_rate=1e-3),
)


def p_tuning(
    train: list[ClassificationExample],
    scored: list[ClassificationExample],
    encoder_type: str = "MLP",
    num_virtual_tokens: int = NUM_VIRTUAL_TOKENS,
    encoder_hidden_size: int | None = None,
    init_text: str | None = INIT_TEXT,
) -> Technique:
    """P-tuning on reviews: trained on ``train``, scored on ``scored``; the prompt starts from
    ``init_text``'s embeddings (None: PEFT's random start)."""
    return Technique(
        prepare=lambda model, tokenizer: add_p_tuning(
            model, num_virtual_tokens, encoder_hidden_size, encoder_type, tokenizer, init_text
        ),
        data=lambda tokenizer: [verbalized_example(tokenizer, ex) for ex in train],
        score=lambda model, tokenizer: sentiment_outcomes(model, tokenizer, scored),
    )


@recorded
@cached
def run_p_tuning_on_validation(
    learning_rate: float, encoder_type: str = "MLP", init_text: str | None = INIT_TEXT
):
    """P-tuning on four fifths of the training reviews, scored on the other fifth."""
    tuning = sentiment_validation_split()
    config = replace(PRESETS.tiny, learning_rate=learning_rate)
    technique = p_tuning(tuning.train, tuning.heldout, encoder_type, init_text=init_text)
    return run_on_tiny_model(technique, config, prompt_tuning_state_dict)


def choose_learning_rate(rates: Iterable[float] = LEARNING_RATES) -> float:
    """The rate with the best validation accuracy (the lower rate on a tie)."""
    return best_learning_rate(lambda rate: run_p_tuning_on_validation(rate).after.value, rates)


def loss_figure(ax) -> None:
    """The validation runs' loss curves: the four rates from the text's start, and one from
    PEFT's random start."""
    runs = {f"lr {rate:g}": run_p_tuning_on_validation(rate) for rate in LEARNING_RATES}
    runs[f"lr {PRESETS.tiny.learning_rate:g}, random start"] = run_p_tuning_on_validation(
        PRESETS.tiny.learning_rate, init_text=None
    )
    plot_losses(ax, runs, "P-tuning on sentiment, four learning rates")


@recorded
@cached
def run_p_tuning(seed: int = 0, encoder_type: str = "MLP"):
    """Our P-tuning on the tiny model at the preset's rate, scored on the held-out reviews."""
    split = sentiment_task()
    config = replace(PRESETS.tiny, seed=seed)
    return run_on_tiny_model(
        p_tuning(split.train, split.heldout, encoder_type), config, prompt_tuning_state_dict
    )


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Fine-tune a prompt made by a prompt encoder, for a frozen causal LM to write the sentiment "
        "label after a review."
    )
    parser.add_argument(
        "--num-virtual-tokens", type=positive_int, default=NUM_VIRTUAL_TOKENS, help="length of the prompt"
    )
    parser.add_argument(
        "--encoder-type", choices=ENCODER_TYPES, default="MLP", help="the network that makes the prompt"
    )
    parser.add_argument(
        "--encoder-hidden-size",
        type=positive_int,
        help="the encoder's width (default: the model's, as PEFT's; an LSTM that wide on a 7B model "
        "trains about 0.8 billion numbers)",
    )
    add_training_arguments(parser, PRESETS)
    add_output_argument(
        parser,
        "the prompt the encoder makes, as a PEFT adapter (the encoder itself is dropped)",
        "PEFT's PeftModel.from_pretrained",
    )
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    split = sentiment_task()
    technique = p_tuning(
        split.train, split.heldout, args.encoder_type, args.num_virtual_tokens, args.encoder_hidden_size
    )
    run = run_technique(technique, model, tokenizer, training_config(args, PRESETS), keep_model=True)
    print(run.report("sentiment accuracy"))
    if args.output is not None:
        save_p_tuning(run.model, args.output, None if args.model == TINY else args.model)
        tokenizer.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main_guard(main)
