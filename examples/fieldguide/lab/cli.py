"""The command line every runnable example shares.

Every example takes ``--model``, ``--device`` and ``--seed``; every example that trains also
takes the same six training flags (``add_training_arguments``), whose defaults come from the
technique's presets: one for the lab's tiny model on a CPU, one for a real model. A mistake on
the command line ends the program with one line that names the argument and exit status 2,
never a traceback; that includes a ``--model`` that names neither a local folder nor a Hub id
(``model_name``), refused before anything loads. ``--help`` shows every default and names
the command as it was typed (``fieldguide generate`` or ``python -m fieldguide.lab.generate``).

This module imports nothing else of the lab, so every other module may import it.
"""

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

TINY = "tiny"  # the --model value that names the lab's own model
PACKAGE = Path(__file__).resolve().parents[1]  # examples/fieldguide: module names start here


def program_name() -> str | None:
    """The command that ran this example, as a reader would type it again.

    ``fieldguide generate`` sets ``sys.argv[0]`` itself; ``python -m fieldguide.lab.generate``
    leaves the file's path there, which argparse would print as ``generate.py``, a command
    that does not work. ``None`` (anything else, such as pytest) keeps argparse's default.
    """
    command = sys.argv[0] if sys.argv else ""
    if command.startswith("fieldguide "):
        return command
    path = Path(command).resolve()
    if path.suffix != ".py" or not path.is_relative_to(PACKAGE):
        return None
    module = path.relative_to(PACKAGE.parent).with_suffix("")
    return "python -m " + ".".join(module.parts)


def help_with_default(action) -> str:
    """An option's help (``action``, an ``argparse.Action``) with its default appended, unless
    the text already states one.

    A default of None means "something else decides" (the preset, the model, all of them):
    those options say so in words, since "(default: None)" would tell a reader nothing.
    """
    text = action.help or ""
    if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
        return text
    return f"{text} (default: %(default)s)"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default (see ``help_with_default``)."""

    def _get_help_string(self, action) -> str:
        return help_with_default(action)


class ExampleParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are a single line on stderr, and whose ``--help``
    names the command as it was typed and shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("prog", program_name())
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

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


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1), such as the fraction of replayed examples."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A weight in [0, 1], such as distillation's alpha."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def non_empty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it at import, or as set since then."""
    return (
        constants.HF_HUB_OFFLINE
        or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    )


def is_hub_id(name: str) -> bool:
    """True for a name in the Hub's repo-id syntax, ``owner/name`` (``Qwen/Qwen2.5-0.5B``)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def model_name_problem(name: str) -> str | None:
    """What is wrong with a ``--model`` value, or None: the lab's model, an existing folder,
    or a Hub id that can be reached.

    Decided before anything loads, so that a typo fails at once and says what it was taken
    for, instead of after the Hub client's retries. Without HF_HUB_OFFLINE a Hub id is
    looked up on the Hub, so a machine with no network still waits for those retries: set
    HF_HUB_OFFLINE=1 there.
    """
    try:
        if name == TINY or Path(name).expanduser().is_dir():
            return None
    except RuntimeError:  # "~nosuchuser/x": expanduser cannot find the home folder
        return f"no local folder named {name!r}: {name.split('/')[0]!r} names no user's home"
    if "/" not in name and isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None  # a legacy one-word id (gpt2) already in the local Hub cache
    if not is_hub_id(name):
        hint = " (older one-word ids need their owner now: openai-community/gpt2)" if "/" not in name else ""
        return f"no local folder named {name!r}, and {name!r} is not a Hugging Face Hub id (owner/name){hint}"
    if _offline() and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        return (
            f"{name!r} was taken for a Hugging Face Hub id, but HF_HUB_OFFLINE is set and it is "
            "not in the local cache"
        )
    return None


def model_name(text: str) -> str:
    """The ``--model`` argument's type: refuses a name that cannot name a model."""
    problem = model_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


MODEL_HELP = (
    f"local directory or Hugging Face model id (owner/name); {TINY!r} (default) is the lab's own model"
)


def example_parser(description: str, model_help: str = MODEL_HELP) -> ExampleParser:
    """A parser with the three arguments every example takes."""
    parser = ExampleParser(description=description)
    parser.add_argument("--model", type=model_name, default=TINY, help=model_help)
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)"
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="one seed for the data, any new weights and the order of the examples (default: 0)",
    )
    return parser


# The training flags, each mapped onto the TrainConfig field it overrides. Their parser
# defaults are None, meaning "the preset's value"; --help prints both presets' values.
TRAINING_FLAGS = {
    "--learning-rate": ("learning_rate", positive_float, "peak learning rate of AdamW"),
    "--batch-size": ("batch_size", positive_int, "examples per micro-batch"),
    "--grad-accum-steps": ("grad_accum_steps", positive_int, "micro-batches per optimizer step"),
    "--max-steps": ("max_steps", positive_int, "optimizer steps"),
    "--bf16": ("bf16", None, "bfloat16 autocast, weights and optimizer kept in float32"),
    "--gradient-checkpointing": ("gradient_checkpointing", None, "recompute activations to save memory"),
}


def add_training_arguments(parser: ExampleParser, presets) -> None:
    """Add the six training flags; ``presets`` is a ``fieldguide.lab.experiment.Presets``."""
    group = parser.add_argument_group("training (defaults: the tiny model's preset / a real model's)")
    for flag, (name, kind, text) in TRAINING_FLAGS.items():
        tiny, real = getattr(presets.tiny, name), getattr(presets.real, name)
        if kind is None:  # a switch: --bf16 / --no-bf16
            real_text = f"{real} on cuda" if real else "False"
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} (default: {tiny} / {real_text})",
            )
        else:
            group.add_argument(flag, type=kind, default=None, help=f"{text} (default: {tiny:g} / {real:g})")


def training_config(args: argparse.Namespace, presets):
    """The preset for ``args.model`` and ``args.device``, with every flag given applied on top."""
    config = presets.for_model(args.model, args.device)
    given = {
        name: getattr(args, name)
        for name, *_ in TRAINING_FLAGS.values()
        if getattr(args, name, None) is not None
    }
    return replace(config, seed=args.seed, **given)


def add_chat_template_argument(parser: ExampleParser) -> None:
    """``--chat-template``, for a base model without one."""
    parser.add_argument(
        "--chat-template",
        type=existing_file,
        metavar="FILE",
        help="a Jinja chat template, for a model without one (default: the model's own)",
    )


def add_output_argument(
    parser: ExampleParser, what: str = "the fine-tuned model", loaded_by: str = "--model DIR"
) -> None:
    """``--output``: where a training example saves what it trained, and what loads it back
    (``loaded_by``: ``--model`` for a whole model; an adapter names its own loader)."""
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help=f"directory for {what}: weights as safetensors, with the tokenizer, "
        f"loadable with {loaded_by} (default: not saved)",
    )


def add_chat_arguments(parser: ExampleParser) -> None:
    """``--chat-template``, for a base model without one, and ``--output``, to save the result."""
    add_chat_template_argument(parser)
    add_output_argument(parser)


def add_replay_argument(parser: ExampleParser) -> None:
    """``--replay``: the share of the tiny model's pretraining stories mixed back in."""
    parser.add_argument(
        "--replay",
        type=fraction,
        default=0.0,
        help="share of replayed animal stories, the tiny model's pretraining text (default: 0)",
    )


def require_new_output(parser: ExampleParser, output: Path | None) -> None:
    """Refuse an ``--output`` that holds something already, or that cannot be made, before any
    training is paid for. The folder is made here, empty, so a bad path fails now, not after."""
    if output is None:
        return
    if output.is_file():
        parser.error(f"argument --output: {output} is a file; name a new folder")
    if output.is_dir() and any(output.iterdir()):
        parser.error(f"argument --output: {output} exists and is not empty; name a new folder or remove it")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --output: cannot make the folder {output}: {error.strerror}")


def require_device(parser: ExampleParser, device: str) -> None:
    """Refuse ``--device cuda`` on a machine where PyTorch sees no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda was asked for, but PyTorch sees no CUDA GPU")


def quiet_unless_terminal() -> None:
    """Turn off transformers' progress bars unless someone is watching a terminal."""
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()


def main_guard(main):
    """Run ``main`` and turn a ValueError from bad input into one line and exit status 1."""
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
