"""Merging fine-tunes from scratch: task arithmetic, TIES and DARE, on LoRA adapters.

A fine-tune's task vector is what it changed: its weights minus the base's (Ilharco et al.,
2023). For a LoRA adapter that is, layer by layer, its delta weight ``scaling * B @ A``. Task
arithmetic adds task vectors, each times a weight; TIES (Yadav et al., 2023) first trims
each to its largest entries, elects one sign per entry and averages only the values that
agree with it; DARE (Yu et al., 2024) drops entries at random and rescales the rest, before
either. The functions take a list of task tensors of one shape, as PEFT's ``merge_utils``
does, and give the same results. ``merged_model`` adds the merge into a copy of the base.
"""

import copy
from collections.abc import Callable

import torch
from torch import nn

from fieldguide.lab.loading import load_model
from fieldguide.lab.metrics import exact_match_outcomes, sentiment_outcomes
from fieldguide.lab.stats import score
from fieldguide.lab.tasks import instruction_task, sentiment_task
from fieldguide.parameter_efficient.lora import run_instruction_lora, run_lora


def task_arithmetic(task_tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i weights[i] * task_tensors[i]``: Ilharco et al.'s addition of task vectors."""
    return sum(weight * tensor for weight, tensor in zip(weights, task_tensors, strict=True))


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries largest in magnitude, zero the rest (TIES's trim)."""
    keep = int(density * tensor.numel())
    largest = tensor.abs().flatten().topk(keep).indices
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[largest] = 1
    return tensor * mask.view(tensor.shape)


def drop_and_rescale(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, and divide the kept ones by it, so
    that every entry keeps its expected value."""
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def elect_sign(task_tensors: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES's elected sign of every entry across the stacked ``task_tensors`` (task, ...):
    the sign of their sum ("total", the paper's) or of their signs' sum ("frequency");
    a tie goes to +1. Returns the mask of the entries that agree with it."""
    if method == "total":
        vote = task_tensors.sum(dim=0)
    elif method == "frequency":
        vote = task_tensors.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown sign election {method!r}; choose 'total' or 'frequency'")
    elected = torch.where(vote >= 0, 1.0, -1.0)
    return task_tensors.sign() == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """The mean, entry by entry, over the tasks that agree with the elected sign (0 where none does)."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def ties(
    task_tensors: list[torch.Tensor], weights: list[float], density: float, sign_method: str = "total"
) -> torch.Tensor:
    """TIES: trim each task tensor to ``density``, elect signs, average the weighted values that agree."""
    trimmed = torch.stack([trim(tensor, density) for tensor in task_tensors])
    return _weighted_disjoint_mean(trimmed, weights, sign_method)


def dare_linear(
    task_tensors: list[torch.Tensor],
    weights: list[float],
    density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE, then task arithmetic."""
    return task_arithmetic([drop_and_rescale(tensor, density, generator) for tensor in task_tensors], weights)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: list[float],
    density: float,
    sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE instead of TIES's trim, then TIES's sign election and disjoint mean."""
    dropped = torch.stack([drop_and_rescale(tensor, density, generator) for tensor in task_tensors])
    return _weighted_disjoint_mean(dropped, weights, sign_method)


def _weighted_disjoint_mean(stacked: torch.Tensor, weights: list[float], sign_method: str) -> torch.Tensor:
    agree = elect_sign(stacked, sign_method)  # the vote is on the unweighted values, as in PEFT
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    return disjoint_mean(weighted, agree)


# -- LoRA adapters as task vectors ---------------------------------------------------------------


def lora_task_vector(adapter: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA adapter (our names: ``<layer>.lora_A.weight`` and ``<layer>.lora_B.weight``) as
    the change it makes to each layer's weight, ``scaling * B @ A``, keyed by the weight's name."""
    layers = sorted(
        {name.removesuffix(".lora_A.weight") for name in adapter if name.endswith(".lora_A.weight")}
    )
    if not layers:
        raise ValueError("not a LoRA adapter: no tensor is named '<layer>.lora_A.weight'")
    return {
        f"{layer}.weight": scaling * adapter[f"{layer}.lora_B.weight"] @ adapter[f"{layer}.lora_A.weight"]
        for layer in layers
    }


def merge_task_vectors(
    task_vectors: list[dict[str, torch.Tensor]], merge: Callable[[list[torch.Tensor]], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One merged change per weight: ``merge`` applied to that weight's task tensors."""
    names = task_vectors[0].keys()
    if any(vector.keys() != names for vector in task_vectors):
        raise ValueError(
            "the task vectors change different weights: they come from different layers or models"
        )
    return {name: merge([vector[name] for vector in task_vectors]) for name in names}


def merged_model(base: nn.Module, change: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``base`` with ``change`` added to its weights: a plain model, as fast as the base."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in change.items():
            weight = model.get_parameter(name)
            weight.add_(delta.to(weight.dtype))
    return model


# -- The lab's two adapters, merged --------------------------------------------------------------

# Both of the LoRA page's adapters are rank 8 with lora_alpha 16 on every linear layer.
LAB_SCALING = 16 / 8
DENSITY = 0.2  # the share of each task vector that TIES keeps, and that DARE keeps on average


def lab_task_vectors() -> dict[str, dict[str, torch.Tensor]]:
    """The task vectors of the LoRA page's two adapters: one trained on reviews, one on instructions."""
    return {
        "reviews": lora_task_vector(run_lora().adapter, LAB_SCALING),
        "instructions": lora_task_vector(run_instruction_lora().adapter, LAB_SCALING),
    }


def both_tasks(model: nn.Module, tokenizer) -> dict[str, list]:
    """Per-item outcomes on both tasks' held-out items: sentiment accuracy, and exact match."""
    return {
        "sentiment": sentiment_outcomes(model, tokenizer, sentiment_task().heldout),
        "exact match": exact_match_outcomes(model, tokenizer, instruction_task().heldout),
    }


def score_changes(changes: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, list]]:
    """Both tasks scored on the tiny model with each change (name -> merged change) added."""
    base, tokenizer = load_model("tiny")
    return {
        name: both_tasks(merged_model(base, change).eval(), tokenizer) for name, change in changes.items()
    }


def report(outcomes: dict[str, dict[str, list]]) -> str:
    """One line per model: each task's score with its interval."""
    return "\n".join(
        f"{name}: " + ", ".join(f"{task} {score(items)}" for task, items in result.items())
        for name, result in outcomes.items()
    )


WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the instructions vector's weight, the reviews' held at 1


def weight_sweep() -> dict[float, dict[str, float]]:
    """Task arithmetic with the reviews vector at weight 1 and the instructions vector at each
    of ``WEIGHTS``: both tasks' scores, as the second task is let in."""
    vectors = list(lab_task_vectors().values())
    changes = {
        weight: merge_task_vectors(vectors, lambda tensors, w=weight: task_arithmetic(tensors, [1.0, w]))
        for weight in WEIGHTS
    }
    scored = score_changes(changes)
    return {
        weight: {task: score(items).value for task, items in result.items()}
        for weight, result in scored.items()
    }


def weight_sweep_figure(ax) -> None:
    """Both tasks' scores as the instructions vector's weight grows: the trade-off of one merge."""
    sweep = weight_sweep()
    for task in ("sentiment", "exact match"):
        ax.plot(list(sweep), [scores[task] for scores in sweep.values()], marker="o", label=task)
    ax.set_xlabel("weight of the instructions task vector (the reviews vector's weight is 1)")
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1)
    ax.set_title("Task arithmetic of the lab's two LoRA adapters")
    ax.legend()
