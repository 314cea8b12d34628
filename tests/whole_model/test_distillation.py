"""Knowledge distillation: our loss against TRL's and PyTorch's, and its error cases."""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from fieldguide.lab.data import IGNORE_INDEX
from fieldguide.lab.experiment import frozen_copy
from fieldguide.lab.loading import load_model
from fieldguide.lab.tasks import (
    ClassificationExample,
    Split,
    sentiment_key,
    sentiment_task,
    verbalized_example,
)
from fieldguide.lab.training import TrainConfig, causal_lm_loss, train
from fieldguide.whole_model import distillation
from fieldguide.whole_model.distillation import (
    DistillConfig,
    build_student,
    compare_students,
    distillation_loss,
    distillation_loss_fn,
    graded_task,
    label_probabilities,
    main,
    readers_cross_entropy,
    soft_target_kl,
    speedup,
    teacher_and_transfer,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKD lives in trl.experimental in TRL 1.x
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer


def random_case(shape, masked, seed=0):
    """Student and teacher logits (B, T, V) and labels (B, T) with some targets masked."""
    generator = torch.Generator().manual_seed(seed)
    batch, length, vocab = shape
    student = torch.randn(shape, generator=generator) * 3
    teacher = torch.randn(shape, generator=generator) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[torch.rand(batch, length, generator=generator) < masked] = IGNORE_INDEX
    labels[0, -1] = 5  # at least one target survives the mask
    return student, teacher, labels


CASES = [  # (B, T, V), fraction of labels masked, temperature
    ((1, 2, 7), 0.0, 1.0),
    ((2, 5, 11), 0.5, 2.0),
    ((3, 9, 463), 0.3, 0.5),
    ((4, 16, 50), 0.8, 4.0),
    ((2, 33, 463), 0.0, 10.0),
]


@pytest.mark.parametrize(("shape", "masked", "temperature"), CASES)
def test_soft_term_matches_trl_gkd_forward_kl(shape, masked, temperature):
    student, teacher, labels = random_case(shape, masked)
    total, count = distillation_loss(student, teacher, labels, temperature, alpha=1.0)
    ours = total / count / temperature**2  # the mean KL, without the tau^2 factor
    # TRL takes logits and labels already aligned: drop the shift that our loss does itself.
    theirs = GKDTrainer.generalized_jsd_loss(
        student[:, :-1], teacher[:, :-1], labels[:, 1:], beta=0.0, temperature=temperature
    )
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("shape", "masked", "temperature"), CASES)
def test_soft_term_matches_torch_kl_div(shape, masked, temperature):
    student, teacher, labels = random_case(shape, masked)
    mask = labels[:, 1:] != IGNORE_INDEX
    s = F.log_softmax(student[:, :-1][mask] / temperature, dim=-1)
    t = F.log_softmax(teacher[:, :-1][mask] / temperature, dim=-1)
    theirs = F.kl_div(s, t, reduction="batchmean", log_target=True)  # KL(t || s), mean over rows
    ours = soft_target_kl(student[:, :-1][mask], teacher[:, :-1][mask], temperature).mean()
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("shape", "masked", "temperature"), CASES)
def test_hard_term_is_the_lab_cross_entropy(shape, masked, temperature):
    student, teacher, labels = random_case(shape, masked)
    total, count = distillation_loss(student, teacher, labels, temperature, alpha=0.0)
    expected = F.cross_entropy(student[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(total, expected, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0])
def test_identical_models_have_no_soft_loss(temperature):
    student, _, labels = random_case((2, 6, 20), 0.2)
    total, _ = distillation_loss(student, student.clone(), labels, temperature, alpha=1.0)
    assert abs(total.item()) < 1e-4


def test_loss_fn_trains_the_student_and_leaves_the_teacher(tiny):
    model, tokenizer = tiny
    teacher = frozen_copy(model)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, tokenizer)
    data = [verbalized_example(tokenizer, ClassificationExample("the pie is sweet and warm.", 1))] * 4
    losses = train(
        student,
        data,
        TrainConfig(max_steps=5, batch_size=4, progress=False),
        loss_fn=distillation_loss_fn(teacher, temperature=2.0, alpha=0.5),
    )
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert student.num_parameters() < model.num_parameters() / 4


@pytest.mark.parametrize("task", ["sentiment", "graded"])
def test_compare_students_trains_a_teacher_and_three_students_of_one_start(tiny, monkeypatch, task):
    model, tokenizer = tiny
    real = sentiment_task  # scored on a few held-out reviews, to keep the test short
    monkeypatch.setattr(
        distillation, "sentiment_task", lambda seed=0: Split(real(seed).train, real(seed).heldout[:16])
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    short = TrainConfig(max_steps=2, batch_size=4, progress=False)
    runs = compare_students(model, tokenizer, DistillConfig(teacher=short, student=short), task)
    assert list(runs) == ["teacher", "oracle", "hard labels", "soft targets"]
    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # the caller's model is left as it was
    students = [runs[name] for name in ("oracle", "hard labels", "soft targets")]
    assert all(run.total_parameters < runs["teacher"].total_parameters / 4 for run in students)
    assert students[0].before == students[1].before == students[2].before  # the same initial weights
    assert all(run.before.n == 16 for run in runs.values())
    assert all(run.model is None for run in runs.values())  # kept only when asked


def test_the_transfer_set_shares_no_word_set_with_the_teacher_or_the_heldout_reviews():
    reviews = sentiment_task()
    parts = teacher_and_transfer(reviews.train, teacher_share=0.5)
    keys = lambda examples: {sentiment_key(ex) for ex in examples}
    assert not keys(parts.train) & keys(parts.heldout)
    assert not keys(parts.heldout) & keys(reviews.heldout)
    assert sorted(parts.train + parts.heldout, key=str) == sorted(reviews.train, key=str)
    assert 0.4 < len(parts.train) / len(reviews.train) < 0.6


def test_graded_readers_flip_only_reviews_with_but_at_about_the_stated_rate():
    reviews, graded = sentiment_task(), graded_task(mixed_agreement=0.7)
    assert graded.heldout == reviews.heldout  # scored against the rule, the majority's answer
    flips = [
        (" but " in ex.text, g.label != ex.label) for g, ex in zip(graded.train, reviews.train, strict=True)
    ]
    assert not any(flipped for has_but, flipped in flips if not has_but)
    with_but = [flipped for has_but, flipped in flips if has_but]
    rate = sum(with_but) / len(with_but)  # binomial: n about 330, standard error about 0.025
    assert 0.2 < rate < 0.4
    assert graded_task(mixed_agreement=1.0).train == reviews.train  # readers who all agree


def test_label_probabilities_are_the_two_label_words_renormalised(tiny):
    model, tokenizer = tiny
    texts = ["the pie is fresh but cold.", "the nut is not stale."]
    good = label_probabilities(model, tokenizer, [ClassificationExample(t, 1) for t in texts])
    bad = label_probabilities(model, tokenizer, [ClassificationExample(t, 0) for t in texts])
    assert all(abs(g + b - 1) < 1e-5 for g, b in zip(good, bad, strict=True))
    # The readers' cross-entropy weighs the two by the readers' shares: 0.7 on "but" reviews.
    examples = [ClassificationExample(t, 1) for t in texts]
    loss = readers_cross_entropy(model, tokenizer, examples, mixed_agreement=0.7)
    expected = [-(0.7 * math.log(good[0]) + 0.3 * math.log(bad[0])), -math.log(good[1])]
    assert loss == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_equals_the_lab_loss(tiny):
    model, tokenizer = tiny
    batch = {
        k: torch.tensor([v])
        for k, v in verbalized_example(
            tokenizer, ClassificationExample("the nut is dry and cold.", 0)
        ).items()
    }
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    ours = distillation_loss_fn(model, 2.0, alpha=0.0)(model, batch)
    lab = causal_lm_loss(model, batch)
    assert ours[1] == lab[1] and torch.allclose(ours[0], lab[0], rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature > 0"),
        ({"temperature": -1.0}, "temperature > 0"),
        ({"alpha": 1.5}, "0 <= alpha <= 1"),
        ({"alpha": -0.1}, "0 <= alpha <= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    student, teacher, labels = random_case((1, 4, 9), 0.0)
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, labels, **kwargs)


@pytest.mark.parametrize(
    ("teacher_shape", "labels_shape"), [((1, 4, 10), (1, 4)), ((1, 5, 9), (1, 4)), ((1, 4, 9), (1, 3))]
)
def test_mismatched_shapes_are_refused(teacher_shape, labels_shape):
    with pytest.raises(ValueError, match="share one tokenizer"):
        distillation_loss(torch.randn(1, 4, 9), torch.randn(teacher_shape), torch.zeros(labels_shape).long())


def test_speedup_of_a_model_against_itself_is_about_one(micro_model):
    ids = torch.randint(0, 100, (2, 8))
    assert 0.2 < speedup(micro_model, micro_model, ids, rounds=3) < 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--student-steps", "0"], "argument --student-steps: must be 1 or more"),
        (["--task", "poems"], "argument --task: invalid choice"),
        (["--temperature", "0"], "argument --temperature: must be above 0"),
        (["--alpha", "2"], "argument --alpha: must be between 0 and 1"),
        (["--max-steps", "0"], "argument --max-steps: must be 1 or more"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_command_line_saves_the_soft_target_student(tmp_path, capsys):
    argv = ["--max-steps", "1", "--student-steps", "1", "--output", str(tmp_path / "student")]
    main(argv)
    out = capsys.readouterr().out
    assert "soft targets: held-out accuracy" in out and f"saved to {tmp_path / 'student'}" in out
    student, tokenizer = load_model(tmp_path / "student")
    shape = (student.config.num_hidden_layers, student.config.hidden_size)
    assert shape == (1, 64)  # the student's shape, not the teacher's
    assert tokenizer.chat_template  # the tokenizer saved beside it: the lab's, with its template
