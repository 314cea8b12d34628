"""The shared tasks: no held-out content key in training, a sentiment rule, balanced classes."""

import re
from collections import Counter

import pytest

from fieldguide.lab.corpus import ANIMAL_HOMES, make_corpus
from fieldguide.lab.data import IGNORE_INDEX
from fieldguide.lab.reviews import review_split
from fieldguide.lab.tasks import (
    SENTIMENT_LABELS,
    SENTIMENT_PROMPT,
    ClassificationExample,
    context_task,
    instruction_key,
    instruction_task,
    label_word,
    preference_task,
    sentiment_key,
    sentiment_task,
    sentiment_validation_split,
    split_by_key,
    verbalized_example,
)


def preference_key(example):
    """A pair's key: the word sets of both reviews."""
    return tuple(sentiment_key(ClassificationExample(text, 0)) for text in (example.chosen, example.rejected))


KEYED_TASKS = [(sentiment_task, sentiment_key), (instruction_task, instruction_key)]


@pytest.mark.parametrize(("task", "key"), KEYED_TASKS)
def test_no_heldout_key_occurs_in_training(task, key):
    split = task()
    assert split.train and split.heldout
    assert not {key(ex) for ex in split.train} & {key(ex) for ex in split.heldout}
    assert task() == split  # the same split every time


def test_no_review_of_a_heldout_preference_pair_shares_its_words_with_training():
    split = preference_task()
    train_keys = {k for ex in split.train for k in preference_key(ex)}
    assert not train_keys & {k for ex in split.heldout for k in preference_key(ex)}


def test_sentiment_split_is_the_labs_review_split_whatever_the_seed():
    heldout = {ex.text.split(" is ", 1)[1].rstrip(".") for ex in sentiment_task(seed=0).heldout}
    assert heldout == {text for text, _ in review_split()[1]}
    assert heldout == {ex.text.split(" is ", 1)[1].rstrip(".") for ex in sentiment_task(seed=3).heldout}


def test_the_corpus_states_feelings_only_about_training_reviews():
    # A held-out review may appear in pretraining text, but never next to how anyone feels.
    heldout = {text for text, _ in review_split()[1]}
    said = [
        s.split(". it is ", 1)[1].split(".")[0] for s in " ".join(make_corpus(3000)).split("tastes the")[1:]
    ]
    assert len(said) > 300 and not heldout & set(said)


def test_context_answers_are_never_the_home_and_only_the_passage_says_which():
    examples = context_task(distractors=2)
    assert all(ex.answer != ANIMAL_HOMES[ex.question.split()[3]] for ex in examples)
    assert all(ex.passage.count("today the") == 3 and f"at the {ex.answer}." in ex.passage for ex in examples)
    # Without the passage nothing gives today's place away: across the corpus, each animal's
    # days are spread over all nine places other than its home, none far more often than another.
    days = Counter(re.findall(r"today the (\w+) is at the (\w+)\.", " ".join(make_corpus(6000))))
    for animal, home in ANIMAL_HOMES.items():
        counts = [days[animal, place] for place in ANIMAL_HOMES.values() if place != home]
        assert days[animal, home] == 0 and min(counts) > 0.5 * max(counts), (animal, counts)


def test_split_by_key_holds_out_the_asked_share_of_keys():
    items = [(k, i) for k in range(40) for i in range(3)]
    split = split_by_key(items, key=lambda item: item[0], heldout_share=0.25, seed=0)
    assert len({k for k, _ in split.heldout}) == 10 and len(split.heldout) == 30


def test_label_words_are_one_token_each(tiny):
    _, tokenizer = tiny
    for label in range(len(SENTIMENT_LABELS)):
        assert len(tokenizer(label_word(label), add_special_tokens=False)["input_ids"]) == 1


def test_verbalized_example_is_what_the_zero_shot_metric_scores(tiny):
    _, tokenizer = tiny
    example = verbalized_example(tokenizer, ClassificationExample("the pie is stale.", 0))
    prompt = tokenizer(SENTIMENT_PROMPT.format(text="the pie is stale."))["input_ids"]
    answer = tokenizer(" " + SENTIMENT_LABELS[0], add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + answer
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + answer


def test_the_validation_split_carves_whole_word_sets_out_of_the_training_reviews():
    train = sentiment_task().train
    split = sentiment_validation_split()
    assert sorted(split.train + split.heldout, key=repr) == sorted(train, key=repr)
    train_keys = {sentiment_key(ex) for ex in split.train}
    assert train_keys.isdisjoint(sentiment_key(ex) for ex in split.heldout)
    assert 0.1 < len(split.heldout) / len(train) < 0.3  # about a fifth, counted in word sets
