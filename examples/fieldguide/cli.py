"""The command line every runnable example shares: ``--model``, ``--device``, ``--seed``.

A mistake on the command line ends the program with one line that names the argument and
exit status 2, never a traceback.
"""

import argparse
import sys

import torch
import transformers

from fieldguide.loading import TINY, ModelLoadError, load_model


class ExampleParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line on stderr."""

    def error(self, message: str):
        """Print ``message`` as one line naming the program, and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def non_negative_int(text: str) -> int:
    value = int(text)  # argparse turns the ValueError into "invalid non_negative_int value"
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # written this way round so that NaN is rejected too
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_empty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


MODEL_HELP = f"local directory or Hugging Face model id; {TINY!r} (default) is the lab's own model"


def example_parser(description: str, model_help: str = MODEL_HELP) -> ExampleParser:
    """A parser with the three arguments every example takes."""
    parser = ExampleParser(description=description)
    parser.add_argument("--model", default=TINY, help=model_help)
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    return parser


def add_training_arguments(parser: ExampleParser, defaults, batch_size: bool = True) -> None:
    """Add ``--steps``, ``--learning-rate`` and (optionally) ``--batch-size``.

    ``defaults`` is any config with ``max_steps``, ``learning_rate`` and ``batch_size``
    fields, so each example's command line starts from the values its page uses.
    """
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=defaults.max_steps,
        help=f"optimizer steps (default: {defaults.max_steps})",
    )
    parser.add_argument(
        "--learning-rate",
        type=non_negative_float,
        default=defaults.learning_rate,
        help=f"peak learning rate (default: {defaults.learning_rate})",
    )
    if batch_size:
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=defaults.batch_size,
            help=f"examples per step (default: {defaults.batch_size})",
        )


def require_device(parser: ExampleParser, device: str) -> None:
    """Refuse ``--device cuda`` on a machine where PyTorch sees no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda was asked for, but PyTorch sees no CUDA GPU")


def parse_and_load(parser: ExampleParser, argv: list[str] | None = None):
    """Parse ``argv``, seed every generator, load the model; return (args, model, tokenizer)."""
    args = parser.parse_args(argv)
    require_device(parser, args.device)
    transformers.set_seed(args.seed)
    try:
        model, tokenizer = load_model(args.model, args.device)
    except ModelLoadError as error:
        parser.error(f"argument --model: {error}")
    return args, model, tokenizer


def main_guard(main):
    """Run ``main`` and turn a ValueError from bad input into one line and exit status 1."""
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
