"""Prompting: the few-shot prompt's shape, parity of 0-shot with the lab's metric, retrieval."""

import matplotlib
import pytest

from fieldguide.foundations import choosing
from fieldguide.foundations.choosing import (
    few_shot_predictions,
    few_shot_prompt,
    few_shot_sentiment_accuracy,
    plot_decision_diagram,
    retrieve,
)
from fieldguide.lab.metrics import sentiment_accuracy
from fieldguide.lab.tasks import SENTIMENT_PROMPT, ClassificationExample, sentiment_task

GOOD = ClassificationExample("the pie is sweet and fresh.", 1)
BAD = ClassificationExample("the soup is cold and bland.", 0)
QUERY = "the nut is dry and stale."


@pytest.mark.parametrize(
    ("examples", "k", "expected"),
    [
        ([], 0, SENTIMENT_PROMPT.format(text=QUERY)),
        ([GOOD, BAD], 0, SENTIMENT_PROMPT.format(text=QUERY)),
        (
            [GOOD],
            1,
            (
                "the pie is sweet and fresh. overall, the review is good. "
                "the nut is dry and stale. overall, the review is"
            ),
        ),
        (
            [BAD, GOOD],
            2,
            (
                "the soup is cold and bland. overall, the review is bad. "
                "the pie is sweet and fresh. overall, the review is good. "
                "the nut is dry and stale. overall, the review is"
            ),
        ),
        (
            [BAD, GOOD],
            1,
            "the soup is cold and bland. overall, the review is bad. " + SENTIMENT_PROMPT.format(text=QUERY),
        ),
    ],
)
def test_few_shot_prompt(examples, k, expected):
    assert few_shot_prompt(examples, QUERY, k) == expected


@pytest.mark.parametrize("k", [-1, 3])
def test_few_shot_prompt_refuses_a_bad_k(k):
    with pytest.raises(ValueError, match="k must be between 0 and the 2 examples given"):
        few_shot_prompt([GOOD, BAD], QUERY, k)


def test_zero_shot_is_the_lab_metric(tiny):
    model, tokenizer = tiny
    task = sentiment_task()
    heldout = task.heldout[:40]
    ours = few_shot_sentiment_accuracy(model, tokenizer, task.train, heldout, k=0)
    assert ours == sentiment_accuracy(model, tokenizer, heldout)


def test_the_same_seed_draws_the_same_demonstrations(tiny):
    model, tokenizer = tiny
    task = sentiment_task()
    texts = [ex.text for ex in task.heldout[:8]]
    first = few_shot_predictions(model, tokenizer, task.train, texts, k=2, seed=3)
    assert first == few_shot_predictions(model, tokenizer, task.train, texts, k=2, seed=3)


def test_a_prompt_longer_than_the_context_window_is_refused(tiny):
    model, tokenizer = tiny
    task = sentiment_task()
    with pytest.raises(ValueError, match="more than the model's context window of 128"):
        few_shot_sentiment_accuracy(model, tokenizer, task.train, task.heldout[:2], k=6)


def test_bad_inputs_to_the_accuracy_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="between 0 and the 2 training examples, got 3"):
        few_shot_sentiment_accuracy(model, tokenizer, [GOOD, BAD], [BAD], k=3)
    with pytest.raises(ValueError, match="no held-out examples"):
        few_shot_sentiment_accuracy(model, tokenizer, [GOOD, BAD], [], k=1)


NOTES = ["the duck lives in the cave now.", "the goat lives in the forest now.", "the owl is sad today."]


@pytest.mark.parametrize(
    ("query", "k", "expected"),
    [
        ("where does the goat live?", 1, ["the goat lives in the forest now."]),
        ("Where does the DUCK live?", 1, ["the duck lives in the cave now."]),
        ("is the owl sad?", 1, ["the owl is sad today."]),
        (
            "where does the goat live?",
            2,
            ["the goat lives in the forest now.", "the duck lives in the cave now."],
        ),
        ("xyz", 1, ["the duck lives in the cave now."]),  # no overlap anywhere: the first one
    ],
)
def test_retrieve_ranks_by_word_overlap(query, k, expected):
    assert retrieve(NOTES, query, k) == expected


def test_retrieve_needs_documents():
    with pytest.raises(ValueError, match="no documents"):
        retrieve([], "where does the goat live?")


def test_the_decision_diagram_draws_every_question_and_answer():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    plot_decision_diagram(axes)
    texts = {text.get_text() for text in axes.texts}
    plt.close(figure)
    for question, answer in choosing.DECISIONS:
        assert question in texts and answer in texts


def test_the_command_line_prints_both_accuracies(capsys):
    choosing.main(["--shots", "1", "--num-heldout", "10"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0-shot", "1-shot"]


def test_the_command_line_refuses_too_many_shots():
    with pytest.raises(ValueError, match="context window"):
        choosing.main(["--shots", "6", "--num-heldout", "2"])


def test_retrieval_finds_each_animals_note_and_never_the_home():
    import random

    from fieldguide.foundations.choosing import note_store, retrieve
    from fieldguide.lab.corpus import ANIMAL_HOMES, today_question

    notes = note_store(random.Random(3))
    for animal, note in notes.items():
        assert retrieve(list(notes.values()), today_question(animal)) == [note]
        assert not note.endswith(f" {ANIMAL_HOMES[animal]}.")


def test_retrieval_helps_the_base_model(tiny):
    """Issue 8, point 4, on the choosing page: the retrieved note changes the answer."""
    from fieldguide.foundations.choosing import retrieval_outcomes
    from fieldguide.lab.stats import paired_difference

    without, with_retrieval = retrieval_outcomes(*tiny, num_days=5)
    gain, low, _ = paired_difference(without, with_retrieval)
    assert len(without) == 50 and gain >= 0.3 and low > 0
