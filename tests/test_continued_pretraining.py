"""Continued pretraining: the new domain's corpus, the replay mix, the errors."""

import copy

import pytest

from fieldguide.continued_pretraining import (
    SAILOR_SHIPS,
    ContinuedPretrainingConfig,
    continue_pretraining,
    domain_perplexities,
    main,
    make_sea_corpus,
    training_blocks,
)
from fieldguide.corpus import make_corpus


def test_the_sea_corpus_is_reproducible_and_keeps_its_facts():
    stories = make_sea_corpus(50, seed=3)
    assert stories == make_sea_corpus(50, seed=3)
    for story in stories:
        sailor, ship = story.split(".")[0].removeprefix("the ").split(" sails the ")
        assert SAILOR_SHIPS[sailor] == ship


def test_the_sea_corpus_uses_no_content_word_of_the_animal_corpus():
    animal_words = set(" ".join(make_corpus(2000, seed=0)).replace(".", "").split())
    sea_words = set(" ".join(make_sea_corpus(2000, seed=0)).replace(".", "").split())
    assert animal_words & sea_words <= {"the", "a", "is", "to", "and", "in"}


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5])
def test_replay_makes_up_the_asked_share_of_the_blocks(tiny, fraction):
    _, tokenizer = tiny
    config = ContinuedPretrainingConfig(num_stories=100, replay_fraction=fraction)
    blocks = training_blocks(tokenizer, config)
    sea = len(training_blocks(tokenizer, ContinuedPretrainingConfig(num_stories=100)))
    assert (len(blocks) - sea) / len(blocks) == pytest.approx(fraction, abs=0.02)


def test_a_few_steps_lower_the_new_domains_perplexity(tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    before = domain_perplexities(model, tokenizer, num_stories=10)
    continue_pretraining(model, tokenizer, ContinuedPretrainingConfig(num_stories=60, max_steps=8))
    after = domain_perplexities(model, tokenizer, num_stories=10)
    assert after.new_domain < before.new_domain / 10


@pytest.mark.parametrize("bad", [-0.5, 1.0])
def test_a_replay_fraction_outside_zero_to_one_is_refused(bad):
    with pytest.raises(ValueError, match="replay_fraction"):
        ContinuedPretrainingConfig(replay_fraction=bad)


def test_an_empty_sea_corpus_is_refused():
    with pytest.raises(ValueError, match="num_stories"):
        make_sea_corpus(0)


def test_command_line_prints_both_domains(capsys):
    main(["--steps", "2"])
    out = capsys.readouterr().out
    assert "new-domain perplexity" in out and "original perplexity" in out
