"""Knowledge distillation: a small student learns from a fine-tuned teacher, with controls.

The teacher is the tiny model fine-tuned on one part of the sentiment task's training
reviews; the rest, which the teacher never saw, is the transfer set. Three students of one
shape start from the same random weights and learn on the transfer set: from its gold labels
(the oracle), from the teacher's answers (hard labels) and from the teacher's distributions
(soft targets). They are compared twice: on the sentiment task, where every review has one
right label, and on a graded variant, where readers disagree about reviews with "but".

Run it from the command line to see the held-out accuracies::

    python -m fieldguide.whole_model.distillation --task graded
"""

import copy
import math
import random
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from fieldguide.lab.cache import cached
from fieldguide.lab.cli import (
    add_output_argument,
    add_training_arguments,
    example_parser,
    main_guard,
    positive_float,
    positive_int,
    training_config,
    unit_interval,
)
from fieldguide.lab.data import IGNORE_INDEX
from fieldguide.lab.experiment import (
    Presets,
    Run,
    Technique,
    freeze,
    plot_losses,
    real_model_training,
    run_technique,
)
from fieldguide.lab.loading import load_model, parse_and_load, save_if_asked
from fieldguide.lab.metrics import classify_sentiment, label_logprobs, sentiment_outcomes
from fieldguide.lab.pretrain import PretrainConfig, build_model
from fieldguide.lab.tasks import (
    ClassificationExample,
    Split,
    sentiment_key,
    sentiment_prompt,
    sentiment_task,
    split_by_key,
    verbalized_example,
)
from fieldguide.lab.training import LossFn, TrainConfig, causal_lm_loss

# The teacher's fine-tune, which the training flags set: on a real model, a fine-tuning rate
# (Llama 2's) with bf16 and checkpointing. The students are new one-layer models: their
# settings (in DistillConfig) are the same whatever the teacher.
TEACHER_PRESETS = Presets(
    tiny=TrainConfig(max_steps=600, batch_size=16, learning_rate=1e-3),
    real=real_model_training(max_steps=60),
)
TASKS = ("sentiment", "graded")  # one right label per review; readers who disagree on "but"
STUDENTS = ("oracle", "hard labels", "soft targets")


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 1.0  # tau: divides both models' logits, softening the distributions
    alpha: float = 1.0  # weight of the soft-target term; 1 - alpha weights the teacher's hard label
    teacher_share: float = 0.5  # of the training reviews' word sets, the teacher's; the rest transfer
    mixed_agreement: float = 0.7  # graded task: readers who give a "but" review the rule's label
    teacher: TrainConfig = TEACHER_PRESETS.tiny  # fine-tuning of the teacher on its part
    student: TrainConfig = field(  # training of each student: the same for all three; its seed
        # also picks the teacher's part, the graded labels and the students' initial weights
        default_factory=lambda: TrainConfig(max_steps=800, batch_size=16, learning_rate=3e-3)
    )


def soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(p_T || p_S) between the temperature-softened distributions, at every position."""
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    teacher_logprobs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    # Forward KL: the teacher's probabilities weight the log-ratio, so the student is pushed
    # to give weight to every token the teacher finds plausible.
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(dim=-1)  # (...,)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, int]:
    """The loss of equation (eq-distill) on the page, summed over targets not ``IGNORE_INDEX``.

    Logits are (B, T, V) and labels (B, T), unshifted, as in ``causal_lm_loss``. Returns the
    sum and the number of targets, the contract of the lab's ``train`` loop.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)} "
            f"and labels {tuple(labels.shape)} do not match: the models must share one tokenizer"
        )
    if not temperature > 0 or not 0 <= alpha <= 1:
        raise ValueError(f"need temperature > 0 and 0 <= alpha <= 1, got {temperature} and {alpha}")
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    student, teacher = student_logits[:, :-1][mask], teacher_logits[:, :-1][mask]  # (N, V)
    # tau^2 keeps the soft term's gradient as large at any temperature (see the page).
    soft = temperature**2 * soft_target_kl(student, teacher, temperature)  # (N,)
    hard = F.cross_entropy(student.float(), targets[mask], reduction="none")  # (N,)
    return (alpha * soft + (1 - alpha) * hard).sum(), int(mask.sum())


def distillation_loss_fn(teacher: torch.nn.Module, temperature: float, alpha: float) -> LossFn:
    """A ``loss_fn`` for ``train``: the frozen teacher scores each batch the student learns from."""

    def loss_fn(student: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():  # the teacher only supplies targets; no gradient reaches it
            teacher_logits = teacher(**inputs).logits  # (B, T, V)
        student_logits = student(**inputs).logits  # (B, T, V)
        return distillation_loss(student_logits, teacher_logits, batch["labels"], temperature, alpha)

    return loss_fn


def build_student(teacher: torch.nn.Module, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A one-layer Llama of width 64, from random weights, scoring the teacher's vocabulary."""
    shape = PretrainConfig(
        hidden_size=64, num_hidden_layers=1, intermediate_size=172, train=TrainConfig(seed=seed)
    )
    student = build_model(shape, tokenizer)
    # Real models often pad their vocabulary beyond the tokenizer's; the logits must line up.
    student.resize_token_embeddings(teacher.config.vocab_size)
    return student.to(teacher.device)


def readers_share(text: str, mixed_agreement: float) -> float:
    """The share of readers who give a review its rule's label: all of them, unless it has "but"."""
    return mixed_agreement if " but " in text else 1.0


def graded_task(mixed_agreement: float, seed: int = 0) -> Split[ClassificationExample]:
    """The sentiment task with each training review labelled by one reader, who may disagree.

    A review with "but" gets its rule's label from a share ``mixed_agreement`` of readers and
    the other label from the rest; every other review gets its rule's label from all. The
    held-out reviews keep the rule's label, the one most readers give.
    """
    rng = random.Random(seed)
    task = sentiment_task(seed)
    readers = [
        replace(
            ex, label=ex.label if rng.random() < readers_share(ex.text, mixed_agreement) else 1 - ex.label
        )
        for ex in task.train
    ]
    return Split(readers, task.heldout)


def teacher_and_transfer(train: list, teacher_share: float, seed: int = 0) -> Split:
    """The teacher's part of the training reviews (``train``) and the transfer set (``heldout``).

    Split by word set, so no transfer review is a reordering of one the teacher learned.
    """
    parts = split_by_key(train, sentiment_key, 1 - teacher_share, seed)
    return Split(train=parts.train, heldout=parts.heldout)


def label_probabilities(model, tokenizer, examples: list[ClassificationExample]) -> list[float]:
    """The probability the model gives each review's label, of the two label words."""
    logprobs = label_logprobs(model, tokenizer, [sentiment_prompt(ex.text) for ex in examples])  # (N, 2)
    probs = torch.softmax(logprobs, dim=-1)
    return [probs[i, ex.label].item() for i, ex in enumerate(examples)]


def readers_cross_entropy(model, tokenizer, examples: list, mixed_agreement: float) -> list[float]:
    """Per review, -E[log p(a reader's label)]: the loss of predicting one reader's answer.

    It is lowest, at the readers' own entropy, for a model whose probabilities are the shares.
    """
    out = []
    for ex, q in zip(examples, label_probabilities(model, tokenizer, examples), strict=True):
        share, q = readers_share(ex.text, mixed_agreement), min(max(q, 1e-6), 1 - 1e-6)
        out.append(-(share * math.log(q) + (1 - share) * math.log(1 - q)))
    return out


def compare_students(
    model, tokenizer, config: DistillConfig, task: str = "sentiment", keep_models: bool = False
) -> dict[str, Run]:
    """Fine-tune a copy of ``model`` as the teacher on its part; train three students on the rest.

    Every run is scored on the held-out reviews, which none of the four has seen; each keeps
    its model when ``keep_models`` is set.
    """
    seed = config.student.seed
    reviews = sentiment_task(seed) if task == "sentiment" else graded_task(config.mixed_agreement, seed)
    parts = teacher_and_transfer(reviews.train, config.teacher_share, seed)
    heldout_score = lambda model, tokenizer: sentiment_outcomes(model, tokenizer, reviews.heldout)
    as_teacher = Technique(
        prepare=lambda model, tokenizer: copy.deepcopy(model),  # the caller's model stays as it was
        data=lambda tokenizer: [verbalized_example(tokenizer, ex) for ex in parts.train],
        score=heldout_score,
    )
    runs = {"teacher": run_technique(as_teacher, model, tokenizer, config.teacher, keep_model=True)}
    teacher = freeze(runs["teacher"].model)  # the fixed model every student learns from
    transfer = parts.heldout
    answers = classify_sentiment(teacher, tokenizer, [ex.text for ex in transfer])  # its hard labels
    students = {  # name: (labels the student's data carries, its loss)
        "oracle": ([ex.label for ex in transfer], causal_lm_loss),
        "hard labels": (answers, causal_lm_loss),
        # The teacher's answer is the hard-label term's target; with alpha = 1 it has no weight.
        "soft targets": (answers, distillation_loss_fn(teacher, config.temperature, config.alpha)),
    }
    for name, (labels, loss_fn) in students.items():
        data = [
            verbalized_example(tokenizer, ClassificationExample(ex.text, y))
            for ex, y in zip(transfer, labels, strict=True)
        ]
        as_student = Technique(
            prepare=lambda model, tokenizer: build_student(model, tokenizer, seed),  # same weights every time
            data=lambda tokenizer, data=data: data,
            loss=loss_fn,
            score=heldout_score,
        )
        runs[name] = run_technique(as_student, teacher, tokenizer, config.student, keep_model=keep_models)
    if not keep_models:
        runs["teacher"].model = runs["teacher"].tokenizer = None
    return runs


@cached
def run_experiment(task: str = "sentiment", seed: int = 0) -> dict[str, Run]:
    """The page's experiment on the tiny model, kept on disk so doctests and figure share it."""
    model, tokenizer = load_model("tiny")
    config = DistillConfig()
    config = replace(
        config, teacher=replace(config.teacher, seed=seed), student=replace(config.student, seed=seed)
    )
    return compare_students(model, tokenizer, config, task, keep_models=True)


@torch.no_grad()
def speedup(
    teacher: torch.nn.Module, student: torch.nn.Module, input_ids: torch.Tensor, rounds: int = 7
) -> float:
    """How many times faster the student's forward pass is than the teacher's, on one batch.

    The two are timed in turn, round after round, and each keeps its fastest time: the
    measurement least disturbed by whatever else the machine is doing.
    """
    seconds = {teacher: [], student: []}
    for _ in range(rounds + 1):
        for model, times in seconds.items():
            start = time.perf_counter()
            model(input_ids=input_ids)
            times.append(time.perf_counter() - start)
    # The first round only warms up (memory allocation, lazy initialisation).
    return min(seconds[teacher][1:]) / min(seconds[student][1:])


def loss_figure(ax) -> None:
    """The training loss of each student on the graded task, from the page's own runs."""
    runs = run_experiment("graded")
    students = {f"{name} (held-out accuracy {runs[name].after.value:.2f})": runs[name] for name in STUDENTS}
    plot_losses(ax, students, "Three students on the graded task, same weights and steps")


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Distil a fine-tuned teacher into a small student, beside a gold-label oracle.")
    parser.add_argument("--task", choices=TASKS, default="sentiment", help="the task (default: sentiment)")
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="tau, which softens both models' logits (default: 1)",
    )
    parser.add_argument(
        "--alpha", type=unit_interval, default=1.0, help="weight of the soft-target term (default: 1)"
    )
    student = DistillConfig().student
    parser.add_argument(
        "--student-steps",
        type=positive_int,
        default=student.max_steps,
        help=f"optimizer steps of each student (default: {student.max_steps})",
    )
    add_training_arguments(parser, TEACHER_PRESETS)  # the teacher's fine-tune
    add_output_argument(parser, what="the soft-target student")
    args, model, tokenizer = parse_and_load(parser, argv)
    config = DistillConfig(
        temperature=args.temperature,
        alpha=args.alpha,
        teacher=training_config(args, TEACHER_PRESETS),
        student=replace(student, max_steps=args.student_steps, seed=args.seed),
    )
    runs = compare_students(model, tokenizer, config, args.task, keep_models=args.output is not None)
    for name, run in runs.items():
        print(f"{name:>13}: held-out accuracy {run.after}")
    save_if_asked(args.output, runs["soft targets"].model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
