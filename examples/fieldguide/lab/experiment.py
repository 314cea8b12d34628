"""The experiment harness: one way to run a technique, time it, score it and keep the result.

A technique supplies what is particular to it, as a ``Technique``:

* ``prepare``: what trains and what wraps it (all weights; a new head; frozen weights with an
  adapter), as a function of the base model;
* ``loss``: its loss function, with the loop's contract ``(model, batch) -> (loss_sum,
  n_targets)``;
* ``data``: its encoded training examples;
* ``score``: per-item outcomes on held-out items (1 right, 0 wrong, or any number).

``run_technique`` does the rest the same way for every page: one seed, the shared training
loop, the clock, the score before and after with 95% intervals, and one result type, ``Run``.

Two families of methods that are still to come plug in through ``loss``, with no change here:

* A method that keeps a **frozen reference** (distillation's teacher, DPO's reference model)
  builds it with ``frozen_copy`` and closes its loss function over it; the distillation
  page does exactly this.
* A method that **generates during training** (PPO, GRPO) gets prompts as its data, and its
  loss function samples completions from the model being trained (under ``torch.no_grad``),
  scores them with its reward and returns the policy-gradient loss: a rollout per step is
  just a loss that calls ``generate`` first. ``tests/lab/test_experiment.py`` runs one.

``cached`` keeps a run on disk under a hash of the code that produced it, so a page's
doctests and its figures share one run per build, and an unchanged lab trains nothing twice.
"""

import copy
import functools
import hashlib
import inspect
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

import fieldguide
from fieldguide.lab.cli import TINY
from fieldguide.lab.data import pad_batch
from fieldguide.lab.loading import load_model, save_model
from fieldguide.lab.memory import check_memory
from fieldguide.lab.pretrain import cache_root, tiny_model_dir
from fieldguide.lab.stats import Score, paired_score, score
from fieldguide.lab.training import LossFn, TrainConfig, causal_lm_loss, seed_everything, train


@dataclass(frozen=True)
class Presets:
    """A technique's training settings: one for the lab's tiny model, one for real models."""

    tiny: TrainConfig  # the tiny model on a laptop CPU: the settings the page's own runs use
    real: TrainConfig  # any other model: rates from the literature, bf16 and checkpointing

    def for_model(self, model: str, device: str) -> TrainConfig:
        """The preset for ``model`` on ``device``; bf16 autocast only where a GPU runs it."""
        if model == TINY:
            return self.tiny
        return replace(self.real, bf16=self.real.bf16 and device == "cuda")


def real_model_training(max_steps: int, **changes) -> TrainConfig:
    """The preset for fine-tuning a real model, which a technique adapts with ``changes``.

    A learning rate of 2e-5, the rate of Llama 2's supervised fine-tuning and TRL's default
    (the tiny model's rates, a hundred times higher, would wreck a model of real size); 16
    examples a step as 4 micro-batches of 4; bf16 autocast with float32 weights and optimizer
    state; activations recomputed in the backward pass, as TRL does by default.
    """
    base = TrainConfig(
        max_steps=max_steps,
        batch_size=4,
        grad_accum_steps=4,
        learning_rate=2e-5,
        warmup_steps=min(30, max_steps // 10),
        bf16=True,
        gradient_checkpointing=True,
    )
    return replace(base, **changes)


def train_every_weight(model: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """Full fine-tuning's ``prepare``: the model itself, every parameter trainable."""
    model.requires_grad_(True)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` that never trains: a teacher, or a reference model for DPO."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@dataclass(frozen=True)
class Technique:
    """What a technique supplies to ``run_technique``; everything else is shared."""

    data: Callable  # (tokenizer) -> list of encoded training examples
    score: Callable  # (model, tokenizer) -> per-item outcomes on held-out items
    prepare: Callable = train_every_weight  # (base model, tokenizer) -> the module that trains
    loss: LossFn = causal_lm_loss  # (model, batch) -> (loss_sum, n_targets)
    collate: Callable | None = None  # examples -> batch; None: the loop pads with the pad token
    measures: dict = field(default_factory=dict)  # name -> (model, tokenizer) -> float, before and after


@dataclass
class Run:
    """What every technique page reports, measured the same way for every technique."""

    before: Score  # held-out score of the starting model, with its 95% interval
    after: Score  # the same items after training
    gain: Score  # after - before on the same items: the paired difference and its interval
    losses: list[float]  # the training loss of every optimizer step
    seconds: float  # wall-clock time of the training alone
    tokens_per_second: float  # input tokens (padding excluded) trained on per second
    trainable_parameters: int
    total_parameters: int
    measures: dict = field(default_factory=dict)  # name -> [before, after]
    model: PreTrainedModel | None = field(default=None, repr=False, compare=False)  # kept if asked
    tokenizer: object = field(default=None, repr=False, compare=False)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / len(self.losses)

    def report(self, score_name: str) -> str:
        """The run as a command prints it: what trained, the score, what it cost."""
        lines = [
            f"{'trainable parameters':22s} {self.trainable_parameters:,} of {self.total_parameters:,}",
            f"{score_name + ' before':22s} {self.before}",
            f"{score_name + ' after':22s} {self.after}",
            f"{'gain':22s} {self.gain}",
            *(f"{name:22s} {before:.3f} -> {after:.3f}" for name, (before, after) in self.measures.items()),
            f"{'training':22s} {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens per second",
        ]
        return "\n".join(lines)


class _TokenCounter:
    """Wraps a collate function and counts the real (unpadded) input tokens it hands out."""

    def __init__(self, collate: Callable):
        self.collate, self.tokens = collate, 0

    def __call__(self, examples: list) -> dict:
        batch = self.collate(examples)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def run_technique(
    technique: Technique, model, tokenizer, config: TrainConfig, keep_model: bool = False
) -> Run:
    """Prepare ``model``, score it, train it with ``config``, score it again; time the training."""
    seed_everything(config.seed)  # the one seed: new weights, data drawn, order of examples
    trained = technique.prepare(model, tokenizer)
    check_memory(trained)
    before = technique.score(trained, tokenizer)
    measured = {name: [measure(trained, tokenizer)] for name, measure in technique.measures.items()}
    data = technique.data(tokenizer)
    pad_id = tokenizer.pad_token_id
    counter = _TokenCounter(technique.collate or functools.partial(pad_batch, pad_token_id=pad_id))
    start = time.perf_counter()
    losses = train(trained, data, config, loss_fn=technique.loss, collate=counter)
    seconds = time.perf_counter() - start
    after = technique.score(trained, tokenizer)
    for name, measure in technique.measures.items():
        measured[name].append(measure(trained, tokenizer))
    run = make_run(trained, before, after, losses, seconds, counter.tokens, measured)
    if keep_model:
        run.model, run.tokenizer = trained, tokenizer
    return run


def make_run(
    model, before: list, after: list, losses: list, seconds: float, tokens: int, measures=None
) -> Run:
    """A ``Run`` from per-item outcomes and the training's record, for any way of training."""
    return Run(
        before=score(before),
        after=score(after),
        gain=paired_score(before, after),
        losses=losses,
        seconds=seconds,
        tokens_per_second=tokens / seconds,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
        measures=measures or {},
    )


# -- Runs cached on disk --------------------------------------------------------------------------


def code_hash() -> str:
    """A hash of every source file of the examples and of the tiny model in use."""
    package = Path(fieldguide.__file__).parent
    digest = hashlib.sha256(tiny_model_dir().name.encode())
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def _save_run(run: Run, directory: Path) -> None:
    numbers = asdict(replace(run, model=None, tokenizer=None))
    (directory / "run.json").write_text(
        json.dumps({k: v for k, v in numbers.items() if k not in {"model", "tokenizer"}})
    )
    if run.model is not None:
        save_model(run.model, run.tokenizer, directory / "model")


def _load_run(directory: Path) -> Run:
    fields = json.loads((directory / "run.json").read_text())
    run = Run(**{**fields, **{k: Score(**fields[k]) for k in ("before", "after", "gain")}})
    if (directory / "model").is_dir():
        run.model, run.tokenizer = load_model(directory / "model")
    return run


def _write(result: Run | dict, directory: Path) -> None:
    """Save a run, or a dict of runs in its order, under ``directory``, all at once or not at all."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".writing-"))
    runs = {".": result} if isinstance(result, Run) else result
    for name, run in runs.items():
        (scratch / name).mkdir(exist_ok=True)
        _save_run(run, scratch / name)
    (scratch / "names.json").write_text(json.dumps(list(runs)))
    try:  # a rename is atomic: a reader sees the whole result or none of it
        scratch.rename(directory)
    except OSError:  # another process saved the same result first
        shutil.rmtree(scratch)


def _read(directory: Path) -> Run | dict:
    names = json.loads((directory / "names.json").read_text())
    return _load_run(directory) if names == ["."] else {name: _load_run(directory / name) for name in names}


def cached(function: Callable) -> Callable:
    """Compute ``function(*args)`` once per version of the code; later calls read it from disk.

    ``function`` returns a ``Run`` or a dict of them. The key is the function's name, its
    arguments and a hash of all of the examples' code (and of the tiny model in use), as
    myst-nb's jupyter-cache keys a notebook by its code: change any of them and it runs again.
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


def plot_losses(ax, runs: dict, title: str) -> None:
    """Every loss figure on the site: one curve per run, on a log scale, on a matplotlib ``Axes``."""
    for label, run in runs.items():
        ax.plot(range(1, len(run.losses) + 1), run.losses, label=label)
    ax.set_yscale("log")  # first steps near the loss of a uniform guess; the learning is below 1
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per target token)")
    ax.set_title(title)
    ax.legend()
