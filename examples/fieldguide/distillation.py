"""Knowledge distillation: a small student learns from a fine-tuned teacher.

The teacher is a model fine-tuned on the sentiment task; the student, a one-layer model
under a fifth of the tiny model's size, starts from random weights and has only a handful of
labelled reviews. Three students start from the same weights and train for the same steps:
on the labels alone; on the teacher's answers for unlabelled reviews (sequence-level
distillation); and on the teacher's softened distributions (logit distillation).

Run it from the command line to see the four held-out accuracies::

    python -m fieldguide.distillation --labelled 8
"""

import copy
import functools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fieldguide.cli import example_parser, main_guard, non_negative_float, parse_and_load, positive_int
from fieldguide.data import IGNORE_INDEX
from fieldguide.loading import load_model
from fieldguide.metrics import SENTIMENT_PROMPT, classify_sentiment, sentiment_accuracy
from fieldguide.pretrain import PretrainConfig, build_model
from fieldguide.tasks import SENTIMENT_LABELS, sentiment_task
from fieldguide.training import LossFn, TrainConfig, causal_lm_loss, train


@dataclass
class DistillConfig:
    temperature: float = 2.0  # tau: divides both models' logits, softening the distributions
    alpha: float = 0.5  # weight of the soft-label term; 1 - alpha weights the hard-label term
    num_labelled: int = 8  # reviews with a human label: all that the labels-only student gets
    num_unlabelled: int = 256  # further reviews without a label, for the teacher to label
    teacher: TrainConfig = field(  # fine-tuning of the teacher on every labelled training review
        default_factory=lambda: TrainConfig(max_steps=60, batch_size=16, learning_rate=3e-3)
    )
    student: TrainConfig = field(  # training of each student: the same for all three
        default_factory=lambda: TrainConfig(max_steps=60, batch_size=16, learning_rate=3e-3)
    )
    seed: int = 0  # picks the labelled reviews and the students' initial weights


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
    prompt = tokenizer(SENTIMENT_PROMPT.format(text=text))["input_ids"]
    answer = tokenizer(" " + SENTIMENT_LABELS[label], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def build_student(teacher: torch.nn.Module, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A one-layer Llama of width 64, from random weights, scoring the teacher's vocabulary."""
    shape = PretrainConfig(hidden_size=64, num_hidden_layers=1, intermediate_size=172, seed=seed)
    student = build_model(shape, tokenizer)
    # Real models often pad their vocabulary beyond the tokenizer's; the logits must line up.
    student.resize_token_embeddings(teacher.config.vocab_size)
    return student.to(teacher.device)


@dataclass
class Results:
    accuracy: dict  # held-out accuracy of the teacher and of each student
    losses: dict  # the training loss of every step of each run
    teacher: torch.nn.Module  # the fine-tuned teacher, to look inside


def pick_reviews(num_labelled: int, num_unlabelled: int, seed: int = 0) -> tuple[list, list]:
    """Draw the labelled reviews and the unlabelled ones from the task's training split."""
    train_split = sentiment_task().train
    if num_labelled + num_unlabelled > len(train_split):
        raise ValueError(f"the task has {len(train_split)} training reviews; asked for more than that")
    order = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(seed)).tolist()
    reviews = [train_split[i] for i in order[: num_labelled + num_unlabelled]]
    return reviews[:num_labelled], reviews[num_labelled:]


def compare_students(model, tokenizer, config: DistillConfig) -> Results:
    """Fine-tune a copy of ``model`` as the teacher; train three students; score all four."""
    task = sentiment_task()
    labelled, unlabelled = pick_reviews(config.num_labelled, config.num_unlabelled, config.seed)
    teacher = copy.deepcopy(model)  # the caller's model stays as it was
    everything = [encode_review(tokenizer, ex.text, ex.label) for ex in task.train]
    losses = {"teacher": train(teacher, everything, config.teacher)}
    teacher.requires_grad_(False)
    # The transfer set: the labelled reviews with their labels, the others with the teacher's.
    answers = classify_sentiment(teacher, tokenizer, [ex.text for ex in unlabelled])
    gold = [encode_review(tokenizer, ex.text, ex.label) for ex in labelled]
    transfer = gold + [
        encode_review(tokenizer, ex.text, y) for ex, y in zip(unlabelled, answers, strict=True)
    ]
    runs = {  # the few labels are repeated to fill whole batches, so every run sees as many
        "labels only": (gold * math.ceil(config.student.batch_size / len(gold)), causal_lm_loss),
        "sequence-level": (transfer, causal_lm_loss),
        "logit": (transfer, distillation_loss_fn(teacher, config.temperature, config.alpha)),
    }
    accuracy = {"teacher": sentiment_accuracy(teacher, tokenizer, task.heldout)}
    for name, (data, loss_fn) in runs.items():
        student = build_student(teacher, tokenizer, config.seed)  # the same weights every time
        losses[name] = train(student, data, config.student, loss_fn=loss_fn)
        accuracy[name] = sentiment_accuracy(student, tokenizer, task.heldout)
    return Results(accuracy, losses, teacher)


@functools.cache
def run_experiment(seed: int = 0) -> Results:
    """The page's experiment on the tiny model, memoised so doctests and figure share it."""
    model, tokenizer = load_model("tiny")
    return compare_students(model, tokenizer, DistillConfig(seed=seed))


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


def plot_losses(ax) -> None:
    """The training loss of each student, from the page's own runs."""
    results = run_experiment()
    for name in ("labels only", "sequence-level", "logit"):
        ax.plot(results.losses[name], label=f"{name} (held-out accuracy {results.accuracy[name]:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss per target token")
    ax.set_title("Three students, same weights and steps")
    ax.legend()


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Distil a fine-tuned teacher into a small student; compare with labels alone.")
    parser.add_argument("--labelled", type=positive_int, default=8, help="labelled reviews (default: 8)")
    parser.add_argument("--unlabelled", type=positive_int, default=256, help="unlabelled (default: 256)")
    parser.add_argument("--temperature", type=non_negative_float, default=2.0, help="tau (default: 2)")
    parser.add_argument("--alpha", type=non_negative_float, default=0.5, help="soft weight (default: 0.5)")
    args, model, tokenizer = parse_and_load(parser, argv)
    if not args.temperature > 0 or not args.alpha <= 1:
        parser.error("need --temperature above 0 and --alpha between 0 and 1")
    config = DistillConfig(args.temperature, args.alpha, args.labelled, args.unlabelled, seed=args.seed)
    for name, accuracy in compare_students(model, tokenizer, config).accuracy.items():
        print(f"{name:>15}: held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main_guard(main)
