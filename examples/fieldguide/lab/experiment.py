"""The experiment harness: one way to run a technique, time it and score it.

A technique supplies what is particular to it, as a ``Technique``:

* ``prepare``: what trains and what wraps it (all weights; a new head; frozen weights with an
  adapter), as a function of the base model;
* ``loss``: its loss function, with the loop's contract ``(model, batch) -> (loss_sum,
  n_targets)``, optionally followed by a dict of numbers to log (a reward, a KL, a margin);
* ``data``: its encoded training examples;
* ``score``: per-item outcomes on held-out items (1 right, 0 wrong, or any number).

``run_technique`` does the rest the same way for every page: one seed, the shared training
loop, the clock, the score before and after with 95% intervals, and one result type, ``Run``.

The methods still to come plug in without a change here:

* A method that keeps a **frozen reference** (distillation's teacher, DPO's reference model)
  makes it with ``frozen_copy`` (or ``freeze``) and closes its loss function over it; the
  distillation page does exactly this.
* A method that **generates during training** and takes one step per rollout (GRPO, as TRL
  runs it by default) gets prompts as its data, and its loss function samples completions
  from the model being trained (under ``torch.no_grad``), scores them and returns the policy
  loss. One that **learns from each rollout several times** (PPO: several epochs of
  minibatches, against the log-probabilities stored at sampling time) gives a ``sampler``
  that draws prompts, generates, and yields the stored experience as micro-batches, epoch
  after epoch. ``tests/lab/test_experiment.py`` runs both.
* A method that needs another **optimizer** (8-bit or paged AdamW, a second rate for some
  parameters) gives ``optimizer``.

Batches are dicts. Tensors are moved to the model's device and anything else reaches the
loss function as it is; ``num_tokens``, if a batch has it, is the count of real input tokens
(else every ``*attention_mask`` is summed, else ``input_ids`` counted), for tokens per second.
"""

import copy
import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel

from fieldguide.lab.cli import TINY
from fieldguide.lab.data import pad_batch
from fieldguide.lab.loading import load_model
from fieldguide.lab.memory import check_memory
from fieldguide.lab.stats import Score, paired_score, score
from fieldguide.lab.training import (
    Sampler,
    TrainConfig,
    adamw,
    causal_lm_loss,
    seed_everything,
    shuffled,
    train,
)


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
    (the tiny model's rates, 50 to 150 times higher, would wreck a model of real size); 16
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


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` a fixed function: evaluation mode, no parameter trainable."""
    model.eval().requires_grad_(False)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` that never trains: DPO's reference model, say, beside the policy."""
    return freeze(copy.deepcopy(model))


@dataclass(frozen=True)
class Technique:
    """What a technique supplies to ``run_technique``; everything else is shared."""

    data: Callable  # (tokenizer) -> list of encoded training examples
    score: Callable  # (model, tokenizer) -> per-item outcomes on held-out items
    prepare: Callable = train_every_weight  # (base model, tokenizer) -> the module that trains
    loss: Callable = causal_lm_loss  # (model, batch) -> (loss_sum, n_targets[, {name: number}])
    collate: Callable | None = None  # examples -> batch; None: the loop pads with the pad token
    measures: dict = field(default_factory=dict)  # name -> (model, tokenizer) -> float, before and after
    sampler: Sampler = shuffled  # (model, dataset, config, start) -> micro-batches of examples
    optimizer: Callable = adamw  # (trainable parameters, config) -> a torch optimizer


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
    logs: dict = field(default_factory=dict)  # name -> the loss function's number, per micro-batch
    peak_memory_bytes: int | None = None  # the most GPU memory allocated while training; None on CPU
    outcomes: tuple[list, list] = field(default=([], []), repr=False)  # per item, before and after
    model: PreTrainedModel | None = field(default=None, repr=False, compare=False)  # kept if asked
    # An adapter's own tensors (a LoRA's A and B), kept instead of a model that is not plain
    # transformers: a few kilobytes where the model would be megabytes.
    adapter: dict | None = field(default=None, repr=False, compare=False)
    tokenizer: object = field(default=None, repr=False, compare=False)

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
        if self.peak_memory_bytes is not None:
            lines.append(f"{'peak GPU memory':22s} {self.peak_memory_bytes / 1e9:.1f} GB")
        return "\n".join(lines)


def count_tokens(batch: dict) -> int:
    """The real input tokens of a batch, by the contract in this module's docstring."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    masks = [value for key, value in batch.items() if key.endswith("attention_mask")]
    if masks:
        return sum(int(mask.sum()) for mask in masks)
    return batch["input_ids"].numel() if "input_ids" in batch else 0


class _Recorder:
    """Wraps a collate function and a loss function: counts tokens, keeps the logged numbers."""

    def __init__(self, collate: Callable, loss: Callable):
        self.inner_collate, self.inner_loss = collate, loss
        self.tokens, self.logs = 0, {}

    def collate(self, examples: list) -> dict:
        batch = self.inner_collate(examples)
        self.tokens += count_tokens(batch)
        return batch

    def loss(self, model, batch: dict):
        loss_sum, n_targets, *logged = self.inner_loss(model, batch)
        for name, value in (logged[0] if logged else {}).items():
            self.logs.setdefault(name, []).append(float(value))
        return loss_sum, n_targets


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
    pad = functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id)
    recorder = _Recorder(technique.collate or pad, technique.loss)
    on_gpu = next(trained.parameters()).is_cuda
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = train(
        trained, data, config, recorder.loss, recorder.collate, technique.sampler, technique.optimizer
    )
    seconds = time.perf_counter() - start
    after = technique.score(trained, tokenizer)
    for name, measure in technique.measures.items():
        measured[name].append(measure(trained, tokenizer))
    run = make_run(trained, before, after, losses, seconds, recorder.tokens, measured)
    run.logs = recorder.logs
    run.peak_memory_bytes = torch.cuda.max_memory_allocated() if on_gpu else None
    if keep_model:
        run.model, run.tokenizer = trained, tokenizer
    return run


def step_seconds(models: dict[str, torch.nn.Module], batch: dict, rounds: int = 10) -> dict[str, float]:
    """Each model's time for one training step on ``batch`` (forward, backward, AdamW update).

    The models take their steps in turn, round after round, and each keeps its fastest time,
    the one least disturbed by whatever else the machine is doing; the first round only warms
    up. Side by side like this, the ratio of two times is a fair comparison on any machine.
    """
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        for name, model in models.items()
    }
    times = {name: [] for name in models}
    for _ in range(rounds + 1):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds[1:]) for name, seconds in times.items()}


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
        outcomes=(list(before), list(after)),  # what compares two runs item by item
    )


def keep_only_adapter(run: Run, adapter_state_dict: Callable) -> Run:
    """Keep a run's adapter tensors (``adapter_state_dict(run.model)``) and drop its model: the
    cache keeps tensors, not a technique's own layers."""
    run.adapter = {name: tensor.detach().clone() for name, tensor in adapter_state_dict(run.model).items()}
    run.model = run.tokenizer = None
    return run


def run_on_tiny_model(technique: Technique, config: TrainConfig, adapter_state_dict: Callable) -> Run:
    """``run_technique`` on a fresh copy of the lab's tiny model, keeping only the adapter's
    tensors (``adapter_state_dict(model)``): the run a technique page caches and reports."""
    model, tokenizer = load_model("tiny")
    run = run_technique(technique, model, tokenizer, config, keep_model=True)
    return keep_only_adapter(run, adapter_state_dict)


def best_learning_rate(validation_score: Callable[[float], float], rates: Iterable[float]) -> float:
    """The rate whose run scores best on validation (``validation_score(rate)``); the lower
    rate on a tie, the safer of two that did equally well."""
    return max(rates, key=lambda rate: (validation_score(rate), -rate))


def plateau_left_at(losses: list[float], window: int = 50, below: float = 0.6) -> int | None:
    """The first step at which the mean of the last ``window`` losses is below ``below``; None
    if it never is. On the lab's two-label tasks a run first learns that the answer is one of
    two words, a loss of log 2 (about 0.69), and may stay there long before it learns which."""
    return next(
        (
            step
            for step in range(window, len(losses) + 1)
            if sum(losses[step - window : step]) / window < below
        ),
        None,
    )


def plot_losses(ax, runs: dict, title: str) -> None:
    """Every loss figure on the site: one curve per run, on a log scale, on a matplotlib ``Axes``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for label, run in runs.items():
        # A dot on the last step, and its value in the legend: where the run ended is the
        # number a reader looks for, and a noisy curve's end is hard to read off an axis.
        last = f"{run.losses[-1]:#.2g}".rstrip(".")  # two significant digits, a trailing zero kept
        steps = range(1, len(run.losses) + 1)
        ax.plot(steps, run.losses, marker="o", markevery=[-1], label=f"{label}, last step {last}")
    ax.set_yscale("log")  # first steps near the loss of a uniform guess; the learning is below 1
    # Ticks at 1, 2 and 5 times each power of ten (1 and 3 over more than 2.5 powers, where
    # three would crowd), written as plain decimals: with labels at the powers alone (10^0,
    # 10^1), a value between them cannot be read.
    losses = [loss for run in runs.values() for loss in run.losses]
    decades = math.log10(max(losses) / min(losses))
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0, 3.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats per target token)")
    ax.set_title(title)
    ax.legend()
