"""Loading a model by name: the lab's tiny model, a local directory, or a Hugging Face id.

The tiny model is pretrained the first time it is asked for and cached on disk; every later
load goes through ``from_pretrained`` exactly as a real model's would. Weights are read from
safetensors files only (never pickles), and no code from a model repository is ever run.
"""

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

TINY = "tiny"  # the name that stands for the lab's own model
_RECIPE_MODULES = ("corpus.py", "tokenizer.py", "data.py", "training.py", "pretrain.py")


class ModelLoadError(ValueError):
    """A model name that is neither a usable local directory nor a reachable hub id."""


def cache_root() -> Path:
    """Where built models are kept: ``$FIELD_GUIDE_CACHE``, else ``~/.cache/llm-finetuning-guide``."""
    default = Path.home() / ".cache" / "llm-finetuning-guide"
    return Path(os.environ.get("FIELD_GUIDE_CACHE", default))


def tiny_model_dir() -> Path:
    """The cache directory of the tiny model built by the current code.

    Its name carries a hash of the source files that determine the weights, so editing the
    corpus or the training recipe builds a new model instead of loading a stale one.
    """
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _RECIPE_MODULES:
        digest.update((here / name).read_bytes())
    return cache_root() / f"tiny-llama-{digest.hexdigest()[:12]}"


def ensure_tiny_model() -> Path:
    """Pretrain and save the tiny model unless it is cached already; return its directory."""
    from fieldguide.pretrain import PretrainConfig, pretrain, save

    target = tiny_model_dir()
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    config = PretrainConfig()
    model, tokenizer = pretrain(config)
    # Save into a scratch directory, then rename: a reader never sees a half-written model,
    # and of two processes racing to build it, the second simply keeps the first's copy.
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    save(model, tokenizer, scratch, config)
    try:
        scratch.rename(target)
    except OSError:
        shutil.rmtree(scratch)
    return target


def quiet_unless_terminal() -> None:
    """Turn off transformers' progress bars unless someone is watching a terminal."""
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()


def _looks_like_path(name: str) -> bool:
    """True for names that can only be paths; a hub id such as ``org/model`` is not one."""
    return name.startswith(("/", "~", "./", "../")) or Path(name).exists()


def load_model(
    name_or_path: str = TINY, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in evaluation mode, on ``device``."""
    path = ensure_tiny_model() if name_or_path == TINY else name_or_path
    if _looks_like_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise ModelLoadError(f"cannot load model {name_or_path!r}: no such directory")
    quiet_unless_terminal()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {first_line}") from error
    if tokenizer.pad_token is None:  # many base models ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
