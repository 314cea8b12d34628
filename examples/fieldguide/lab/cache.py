"""Runs kept on disk, keyed by the code that produced them.

A page's doctests and its figures ask for the same runs; ``cached`` computes each once per
version of the code and reads it back afterwards, as myst-nb's jupyter-cache does for
notebooks. The key holds the function, its arguments, a hash of every source file of the
examples, the tiny model in use and the versions of the libraries that compute: change any
of them and the run is computed again, so a page always prints what its current code computes.
"""

import functools
import hashlib
import importlib.metadata
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

import fieldguide
from fieldguide.lab.experiment import Run
from fieldguide.lab.loading import load_model, save_model
from fieldguide.lab.pretrain import cache_root, tiny_model_dir
from fieldguide.lab.stats import Score

LIBRARIES = ("torch", "transformers", "peft", "trl")


def code_hash(package: Path | None = None) -> str:
    """A hash of every source file of ``package`` (the examples), the tiny model in use and
    the versions of the libraries the runs depend on."""
    package = package or Path(fieldguide.__file__).parent
    digest = hashlib.sha256(tiny_model_dir().name.encode())
    for library in LIBRARIES:
        digest.update(f"{library}=={importlib.metadata.version(library)}".encode())
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def _save_run(run: Run, directory: Path) -> None:
    numbers = asdict(replace(run, model=None, tokenizer=None, adapter=None))
    del numbers["model"], numbers["tokenizer"], numbers["adapter"]
    if run.adapter is not None:
        save_file(run.adapter, directory / "adapter.safetensors")
    if run.model is not None:
        if not isinstance(run.model, transformers.PreTrainedModel):
            raise TypeError(f"a cached run can keep a transformers model, not a {type(run.model).__name__}")
        # A model with layers of its own (a from-scratch adapter, say) saves, but from_pretrained
        # would rebuild the plain architecture and fill the unknown layers with random weights.
        with torch.device("meta"):  # shapes only: no memory, even for a real model
            plain = set(type(run.model)(run.model.config).state_dict())
        if extra := sorted(set(run.model.state_dict()) - plain):
            raise TypeError(
                f"a cached run's model must be the plain {type(run.model).__name__} that from_pretrained "
                f"rebuilds; it has {extra[0]} and {len(extra) - 1} more weights of its own (merge them first, "
                "or keep only the adapter's tensors, as run.adapter)"
            )
        save_model(run.model, run.tokenizer, directory / "model")
        numbers["model_class"] = type(run.model).__name__  # reloaded as the same class
    (directory / "run.json").write_text(json.dumps(numbers))


def _load_run(directory: Path) -> Run:
    numbers = json.loads((directory / "run.json").read_text())
    model_class = numbers.pop("model_class", None)
    numbers["outcomes"] = tuple(numbers["outcomes"])  # JSON keeps a tuple as a list
    run = Run(**{**numbers, **{k: Score(**numbers[k]) for k in ("before", "after", "gain")}})
    if (directory / "adapter.safetensors").exists():
        run.adapter = load_file(directory / "adapter.safetensors")
    if model_class is not None:  # back on the CPU, where every cached run was computed
        run.model, run.tokenizer = load_model(
            directory / "model", auto_class=getattr(transformers, model_class)
        )
    return run


def _write(result: Run | dict, directory: Path) -> None:
    """Save a run, or a dict of runs in its order, under ``directory``: all of it or nothing."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".writing-"))
    runs = {None: result} if isinstance(result, Run) else result
    for index, run in enumerate(runs.values()):  # numbered folders: any name is a valid key
        (scratch / str(index)).mkdir()
        _save_run(run, scratch / str(index))
    (scratch / "names.json").write_text(json.dumps(list(runs)))
    try:  # a rename is atomic: a reader sees the whole result or none of it
        scratch.rename(directory)
    except OSError:  # another process saved the same result first
        shutil.rmtree(scratch)


def _read(directory: Path) -> Run | dict:
    names = json.loads((directory / "names.json").read_text())
    runs = {name: _load_run(directory / str(index)) for index, name in enumerate(names)}
    return runs[None] if names == [None] else runs


def cached(function: Callable) -> Callable:
    """Compute ``function(*args)`` once per version of the code; later calls read it from disk.

    ``function`` returns a ``Run`` or a dict of them; a run's kept model must be a transformers
    model, saved and reloaded with ``save_pretrained`` and ``from_pretrained``, and its kept
    ``adapter`` a dict of tensors, saved as safetensors.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = inspect.signature(function).bind(*args, **kwargs)
        bound.apply_defaults()  # f() and f(seed=0) are the same run
        key = f"{function.__module__}.{function.__qualname__}{bound.arguments!r}{code_hash()}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        directory = cache_root() / "runs" / f"{function.__name__}-{digest}"
        if (directory / "names.json").exists():
            return _read(directory)
        result = function(*args, **kwargs)
        _write(result, directory)
        return result

    return wrapper
