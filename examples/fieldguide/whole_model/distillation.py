"""Knowledge distillation: a small student learns from a fine-tuned teacher.

The teacher is a model fine-tuned on the sentiment task; the student, a one-layer model
under a fifth of the tiny model's size, starts from random weights and has only a handful of
labelled reviews. Three students start from the same weights and train for the same steps:
on the labels alone; on the teacher's answers for unlabelled reviews (sequence-level
distillation); and on the teacher's softened distributions (logit distillation).

Run it from the command line to see the four held-out accuracies::

    python -m fieldguide.whole_model.distillation --labelled 8
"""

import copy
import math
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
from fieldguide.lab.data import IGNORE_INDEX, encode_completion
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
from fieldguide.lab.metrics import classify_sentiment, sentiment_outcomes
from fieldguide.lab.pretrain import PretrainConfig, build_model
from fieldguide.lab.tasks import label_word, sentiment_prompt, sentiment_task
from fieldguide.lab.training import LossFn, TrainConfig, causal_lm_loss

# The teacher's fine-tune, which the training flags set: on a real model, a fine-tuning rate
# (Llama 2's) with bf16 and checkpointing. The students are new one-layer models: their
# settings (in DistillConfig) are the same whatever the teacher.
TEACHER_PRESETS = Presets(
    tiny=TrainConfig(max_steps=60, batch_size=16, learning_rate=3e-3),
    real=real_model_training(max_steps=60),
)


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 2.0  # tau: divides both models' logits, softening the distributions
    alpha: float = 0.5  # weight of the soft-label term; 1 - alpha weights the hard-label term
    num_labelled: int = 8  # reviews with a human label: all that the labels-only student gets
    num_unlabelled: int = 256  # further reviews without a label, for the teacher to label
    teacher: TrainConfig = TEACHER_PRESETS.tiny  # fine-tuning of the teacher on every labelled review
    student: TrainConfig = field(  # training of each student: the same for all three; its seed
        # picks the labelled reviews and the students' initial weights
        default_factory=lambda: TrainConfig(max_steps=60, batch_size=16, learning_rate=3e-3)
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


def encode_review(tokenizer, text: str, label: int) -> dict:
    """The metric's verbalizer prompt, then the label word, with a loss on the label word only."""
    return encode_completion(tokenizer, sentiment_prompt(text), label_word(label))


def build_student(teacher: torch.nn.Module, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A one-layer Llama of width 64, from random weights, scoring the teacher's vocabulary."""
    shape = PretrainConfig(
        hidden_size=64, num_hidden_layers=1, intermediate_size=172, train=TrainConfig(seed=seed)
    )
    student = build_model(shape, tokenizer)
    # Real models often pad their vocabulary beyond the tokenizer's; the logits must line up.
    student.resize_token_embeddings(teacher.config.vocab_size)
    return student.to(teacher.device)


def pick_reviews(num_labelled: int, num_unlabelled: int, seed: int = 0) -> tuple[list, list]:
    """Draw the labelled reviews and the unlabelled ones from the task's training split."""
    train_split = sentiment_task().train
    if num_labelled + num_unlabelled > len(train_split):
        raise ValueError(f"the task has {len(train_split)} training reviews; asked for more than that")
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed)).tolist()
    reviews = [train_split[i] for i in order[: num_labelled + num_unlabelled]]
    return reviews[:num_labelled], reviews[num_labelled:]


def compare_students(model, tokenizer, config: DistillConfig, keep_students: bool = False) -> dict[str, Run]:
    """Fine-tune a copy of ``model`` as the teacher; train three students; score all four.

    Each run keeps its model when ``keep_students`` is set (the command line's ``--output``).
    """
    task = sentiment_task()
    heldout_score = lambda model, tokenizer: sentiment_outcomes(model, tokenizer, task.heldout)
    everything = [encode_review(tokenizer, ex.text, ex.label) for ex in task.train]
    as_teacher = Technique(
        prepare=lambda model, tokenizer: copy.deepcopy(model),  # the caller's model stays as it was
        data=lambda tokenizer: everything,
        score=heldout_score,
    )
    runs = {"teacher": run_technique(as_teacher, model, tokenizer, config.teacher, keep_model=True)}
    teacher = freeze(runs["teacher"].model)  # the fixed model every student learns from
    # The transfer set: the labelled reviews with their labels, the others with the teacher's.
    seed = config.student.seed
    labelled, unlabelled = pick_reviews(config.num_labelled, config.num_unlabelled, seed)
    answers = classify_sentiment(teacher, tokenizer, [ex.text for ex in unlabelled])
    gold = [encode_review(tokenizer, ex.text, ex.label) for ex in labelled]
    transfer = gold + [
        encode_review(tokenizer, ex.text, y) for ex, y in zip(unlabelled, answers, strict=True)
    ]
    students = {  # the few labels are repeated to fill whole batches, so every run sees as many
        "labels only": (gold * math.ceil(config.student.batch_size / len(gold)), causal_lm_loss),
        "sequence-level": (transfer, causal_lm_loss),
        "logit": (transfer, distillation_loss_fn(teacher, config.temperature, config.alpha)),
    }
    for name, (data, loss_fn) in students.items():
        as_student = Technique(
            prepare=lambda model, tokenizer: build_student(model, tokenizer, seed),  # same weights every time
            data=lambda tokenizer, data=data: data,
            loss=loss_fn,
            score=heldout_score,
        )
        runs[name] = run_technique(as_student, teacher, tokenizer, config.student, keep_model=keep_students)
    return runs


@cached
def run_experiment(seed: int = 0) -> dict[str, Run]:
    """The page's experiment on the tiny model, kept on disk so doctests and figure share it."""
    model, tokenizer = load_model("tiny")
    config = DistillConfig()
    config = replace(
        config, teacher=replace(config.teacher, seed=seed), student=replace(config.student, seed=seed)
    )
    return compare_students(model, tokenizer, config)


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
    """The training loss of each student, from the page's own runs."""
    runs = run_experiment()
    students = {
        f"{name} (held-out accuracy {runs[name].after.value:.2f})": runs[name]
        for name in ("labels only", "sequence-level", "logit")
    }
    plot_losses(ax, students, "Three students, same weights and steps")


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Distil a fine-tuned teacher into a small student; compare with labels alone.")
    parser.add_argument("--labelled", type=positive_int, default=8, help="labelled reviews (default: 8)")
    parser.add_argument(
        "--unlabelled",
        type=positive_int,
        default=256,
        help="unlabelled reviews the teacher labels (default: 256)",
    )
    parser.add_argument(
        "--temperature",
        type=positive_float,
        default=2.0,
        help="tau, which softens both models' logits (default: 2)",
    )
    parser.add_argument(
        "--alpha", type=unit_interval, default=0.5, help="weight of the soft-label term (default: 0.5)"
    )
    add_training_arguments(parser, TEACHER_PRESETS)  # the teacher's fine-tune
    add_output_argument(parser, what="the logit-distilled student")
    args, model, tokenizer = parse_and_load(parser, argv)
    config = DistillConfig(
        temperature=args.temperature,
        alpha=args.alpha,
        num_labelled=args.labelled,
        num_unlabelled=args.unlabelled,
        teacher=training_config(args, TEACHER_PRESETS),
        student=replace(DistillConfig().student, seed=args.seed),
    )
    runs = compare_students(model, tokenizer, config, keep_students=args.output is not None)
    for name, run in runs.items():
        print(f"{name:>15}: held-out accuracy {run.after}")
    save_if_asked(args.output, runs["logit"].model, tokenizer)  # the student that learned from logits


if __name__ == "__main__":
    main_guard(main)
