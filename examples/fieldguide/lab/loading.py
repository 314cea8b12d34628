"""Loading a model by name: the lab's tiny model, a local directory, or a Hugging Face id.

Every load in the lab goes through ``from_pretrained`` here, exactly as a real model's would:
the tiny model is pretrained the first time it is asked for, cached on disk, and from then on
read back like any other checkpoint. Weights are read from safetensors files only (never
pickles), and no code from a model repository is ever run.
"""

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fieldguide.lab.cli import (
    TINY,
    ExampleParser,
    model_name_problem,
    quiet_unless_terminal,
    require_device,
    require_new_output,
)
from fieldguide.lab.memory import check_weights_fit
from fieldguide.lab.pretrain import ensure_tiny_model
from fieldguide.lab.training import seed_everything


class ModelLoadError(ValueError):
    """A model name that is neither a usable local directory nor a reachable hub id."""


def from_pretrained(auto_class, name: str | Path = TINY, **kwargs):
    """``auto_class.from_pretrained`` for the tiny model, a directory or a hub id.

    The one road to ``from_pretrained`` in the lab: ``"tiny"`` is built on first use, any
    other name must be an existing directory or a Hub id (``owner/name``) that can be reached,
    and a failure of any kind becomes a one-line ``ModelLoadError``.
    """
    name = str(name)
    problem = model_name_problem(name)
    if problem is not None:  # the rule every --model follows (fieldguide.lab.cli.model_name)
        raise ModelLoadError(problem)
    if name == TINY:
        path = str(ensure_tiny_model())
    else:  # a directory wins over a Hub id of the same spelling, as in from_pretrained
        path = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    quiet_unless_terminal()
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model {name!r}: {first_line}") from error


def load_config(name: str | Path = TINY):
    """A model's configuration alone (``config.json``): its shape, without any weights."""
    return from_pretrained(AutoConfig, name)


def load_model(
    name: str | Path = TINY,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    auto_class=None,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model (a causal LM unless ``auto_class`` says otherwise) and its tokenizer.

    The model comes in evaluation mode, on ``device``, its weights in ``dtype``: float32 by
    default, since training keeps its master weights in float32 even under bf16 autocast.
    ``model_kwargs`` go to the model's ``from_pretrained`` (``num_labels=2`` for a classifier).
    """
    tokenizer = from_pretrained(AutoTokenizer, name)
    model = from_pretrained(
        auto_class or AutoModelForCausalLM, name, use_safetensors=True, dtype=dtype, **model_kwargs
    )
    if tokenizer.pad_token is None:  # many base models ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    check_weights_fit(model, device)  # a clear refusal, not an out-of-memory traceback
    return model.to(device).eval(), tokenizer


def parse_and_load(
    parser: ExampleParser, argv: list[str] | None = None, training: bool = True, load_on: str | None = None
):
    """Parse ``argv``, seed every generator, load the model; return (args, model, tokenizer).

    A model that will train keeps float32 weights (bf16 autocast computes in 16 bits, the
    updates need 32); one that only answers is loaded in bfloat16 on a GPU, half the memory.
    The model goes to ``--device``, or to ``load_on`` (QLoRA loads it on the CPU, to quantize
    it onto the GPU layer by layer).
    """
    args = parser.parse_args(argv)
    require_device(parser, args.device)
    require_new_output(parser, getattr(args, "output", None))  # checked before training, not after
    seed_everything(args.seed)
    dtype = torch.bfloat16 if args.device == "cuda" and not training else torch.float32
    try:
        model, tokenizer = load_model(args.model, load_on or args.device, dtype=dtype)
    except ModelLoadError as error:
        parser.error(f"argument --model: {error}")
    return args, model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Save weights (safetensors), configuration and tokenizer: a directory ``load_model`` takes."""
    quiet_unless_terminal()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # with the chat template the model was trained on


def save_if_asked(output: Path | None, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """``--output DIR``: save what an example trained, for ``--model DIR`` to load back."""
    if output is not None:
        save_model(model, tokenizer, output)
        print(f"saved to {output}")
