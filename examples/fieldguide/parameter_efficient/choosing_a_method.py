"""Every fine-tuning method of the site on one task, side by side: what each trains, stores,
costs per step and scores.

Each method's row is the run its own page makes: the same cached function with the same
arguments, so the site trains each once. Every run starts from the lab's tiny model, trains on
the sentiment task's training reviews at its page's learning rate and length with seed 0, and
is scored on the same held-out reviews; full fine-tuning's is the evaluation page's run. So the
differences from full fine-tuning are paired, review by review. Step times are measured here,
all methods side by side in one call on one batch (``step_seconds``): only their ratios travel
from one machine to another.
"""

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fieldguide.lab.data import pad_batch
from fieldguide.lab.experiment import Run, step_seconds, train_every_weight
from fieldguide.lab.loading import load_model, save_model
from fieldguide.lab.stats import Score, paired_score
from fieldguide.lab.tasks import sentiment_task, verbalized_example
from fieldguide.lab.training import TrainConfig
from fieldguide.parameter_efficient import (
    adapters,
    bitfit,
    dora,
    ia3,
    lora,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    qlora,
)
from fieldguide.whole_model import evaluation

FULL = "full fine-tuning"  # the row every other is compared with


@dataclass(frozen=True)
class Method:
    """One row's sources: its page's cached run, how that page prepares the model (to time a
    step), and the training settings the run used."""

    run: Callable[[], Run]
    prepare: Callable  # (base model, tokenizer) -> the module that trains
    config: Callable[[], TrainConfig]  # a function: BitFit's rate is chosen by its own runs


def _classification(technique: Callable) -> Callable:
    """A page's ``prepare`` for techniques built from the sentiment task's two splits."""
    split = sentiment_task()
    return technique(split.train, split.heldout).prepare


METHODS: dict[str, Method] = {  # every row, in the order of the table
    FULL: Method(
        run=lambda: evaluation.rank_methods()[FULL],
        prepare=train_every_weight,
        config=lambda: TrainConfig(
            max_steps=evaluation.RANKING_STEPS, batch_size=16, learning_rate=evaluation.METHODS[FULL][1]
        ),
    ),
    "LoRA": Method(lora.run_lora, lora.lora_fine_tuning().prepare, lambda: lora.PRESETS.tiny),
    "DoRA": Method(
        dora.run_dora, lora.lora_fine_tuning(layer_class=dora.DoraLinear).prepare, lambda: lora.PRESETS.tiny
    ),
    "QLoRA": Method(qlora.run_qlora, qlora.qlora_fine_tuning().prepare, lambda: lora.PRESETS.tiny),
    "adapters": Method(
        adapters.run_adapters, _classification(adapters.adapter_tuning), lambda: adapters.PRESETS.tiny
    ),
    "IA3": Method(ia3.run_ia3, _classification(ia3.ia3_fine_tuning), lambda: ia3.PRESETS.tiny),
    "BitFit": Method(  # a bias added to every linear layer: the tiny model is a Llama, with none
        bitfit.run_bitfit,
        bitfit.PLACEMENTS["all-linear"],
        lambda: replace(bitfit.PRESETS.tiny, learning_rate=bitfit.choose_learning_rate("all-linear")),
    ),
    "prefix tuning": Method(
        prefix_tuning.run_prefix_tuning,
        _classification(prefix_tuning.prefix_tuning),
        lambda: prefix_tuning.PRESETS.tiny,
    ),
    "prompt tuning": Method(
        prompt_tuning.run_prompt_tuning,
        _classification(prompt_tuning.prompt_tuning),
        lambda: prompt_tuning.PRESETS.tiny,
    ),
    "P-tuning": Method(
        p_tuning.run_p_tuning,
        _classification(p_tuning.p_tuning),
        lambda: p_tuning.PRESETS.tiny,
    ),
}


@dataclass(frozen=True)
class Row:
    """One method on the sentiment task, as the comparison table shows it."""

    method: str
    trainable_parameters: int
    file_bytes: int  # what a user keeps: the adapter's tensors, or (full fine-tuning) the model
    stored_parameters: int  # the numbers in that file (P-tuning keeps fewer than it trains)
    steps: int
    learning_rate: float
    heldout: Score  # accuracy on the held-out reviews, with its 95% interval
    versus_full: Score  # this accuracy minus full fine-tuning's, review by review


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """The size of ``tensors`` saved as one safetensors file: the bytes a user stores."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "adapter.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, path)
        return path.stat().st_size


def model_bytes(model, tokenizer) -> int:
    """The size of a whole model's weight files, as ``save_model`` writes them."""
    with tempfile.TemporaryDirectory() as directory:
        save_model(model, tokenizer, Path(directory))
        return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def rows(runs: dict[str, Run], configs: dict[str, TrainConfig], full_model_bytes: int) -> list[Row]:
    """The table from the runs (``FULL`` among them), in their order. A run that kept only its
    adapter stores that; the others (full fine-tuning) store a whole model, ``full_model_bytes``."""
    full = runs[FULL].outcomes[1]
    return [
        Row(
            method=name,
            trainable_parameters=run.trainable_parameters,
            file_bytes=full_model_bytes if run.adapter is None else safetensors_bytes(run.adapter),
            stored_parameters=run.trainable_parameters
            if run.adapter is None
            else sum(tensor.numel() for tensor in run.adapter.values()),
            steps=configs[name].max_steps,
            learning_rate=configs[name].learning_rate,
            heldout=run.after,
            versus_full=paired_score(full, run.outcomes[1]),
        )
        for name, run in runs.items()
    ]


def compare(base, tokenizer, methods: dict[str, Method] | None = None) -> list[Row]:
    """Every method's row (of ``methods``, all of them by default): its page's run, the
    settings it trained with, what it stores."""
    methods = METHODS if methods is None else methods
    runs = {name: method.run() for name, method in methods.items()}
    configs = {name: method.config() for name, method in methods.items()}
    return rows(runs, configs, model_bytes(base, tokenizer))


def trainable_models(
    base: nn.Module, tokenizer, methods: dict[str, Method] | None = None
) -> dict[str, nn.Module]:
    """Each method's model, prepared on its own copy of ``base`` as its page prepares it, in
    training mode; new weights drawn from PyTorch's generator seeded 0."""
    methods = METHODS if methods is None else methods
    torch.manual_seed(0)
    return {name: method.prepare(copy.deepcopy(base), tokenizer).train() for name, method in methods.items()}


def step_time_ratios(
    base: nn.Module, tokenizer, methods: dict[str, Method] | None = None
) -> dict[str, float]:
    """Each method's time for one training step over full fine-tuning's, all measured side by
    side on one batch of 16 training reviews (``step_seconds``)."""
    methods = METHODS if methods is None else methods
    models = trainable_models(base, tokenizer, methods)
    examples = [verbalized_example(tokenizer, ex) for ex in sentiment_task().train[:16]]
    seconds = step_seconds(models, pad_batch(examples, tokenizer.pad_token_id))
    return {name: value / seconds[FULL] for name, value in seconds.items()}


def accuracy_figure(ax, table: list[Row] | None = None) -> None:
    """Every method's held-out accuracy with its 95% interval, one row each, best at the top,
    each labelled with how many numbers it trains; full fine-tuning's score and chance marked."""
    if table is None:  # the figure directive passes ``ax`` alone
        table = compare(*load_model("tiny"))
    ordered = sorted(table, key=lambda row: row.heldout.value)
    for y, row in enumerate(ordered):
        below, above = row.heldout.value - row.heldout.low, row.heldout.high - row.heldout.value
        ax.errorbar(row.heldout.value, y, xerr=[[below], [above]], fmt="o", capsize=3, color="C0")
    ax.set_yticks(range(len(ordered)), [f"{row.method} ({row.trainable_parameters:,})" for row in ordered])
    full = next(row for row in table if row.method == FULL)
    ax.axvline(full.heldout.value, linestyle="--", linewidth=1, color="C1", label="full fine-tuning")
    ax.axvline(0.5, linestyle=":", linewidth=1, color="C2", label="chance: one of two words")
    ax.set_xlabel("held-out accuracy with its 95% interval")
    ax.set_ylabel("method (numbers trained)")
    ax.set_title("Every method on the sentiment task, seed 0")
    ax.legend(loc="upper left", fontsize="small")  # where the best methods leave room
