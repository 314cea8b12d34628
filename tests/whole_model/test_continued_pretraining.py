"""Continued pretraining: the new domain's corpus, the replay mix, the errors."""

import copy
import dataclasses

import pytest

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.experiment import run_technique
from fieldguide.whole_model.continued_pretraining import (
    PRESETS,
    SAILOR_SHIPS,
    domain_adaptation,
    main,
    make_sea_corpus,
    training_blocks,
)


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
    blocks = training_blocks(tokenizer, replay_fraction=fraction)
    sea = len(training_blocks(tokenizer))
    assert (len(blocks) - sea) / len(blocks) == pytest.approx(fraction, abs=0.02)


def test_a_few_steps_lower_the_new_domains_perplexity(tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    config = dataclasses.replace(PRESETS.tiny, max_steps=8, progress=False)
    run = run_technique(domain_adaptation(num_heldout=10), model, tokenizer, config)
    before, after = run.measures["new-domain perplexity"]
    assert after < before / 10
    assert run.after.value < run.before.value  # the mean loss of the held-out sea stories fell


@pytest.mark.parametrize("bad", [-0.5, 1.0])
def test_a_replay_fraction_outside_zero_to_one_is_refused(tiny, bad):
    with pytest.raises(ValueError, match=r"replay fraction must be in \[0, 1\)"):
        training_blocks(tiny[1], replay_fraction=bad)


@pytest.mark.parametrize("bad", ["-0.5", "1"])
def test_the_command_line_refuses_a_replay_fraction_outside_zero_to_one(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--replay", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument --replay: must be at least 0 and below 1, got {bad}" in err


def test_an_empty_sea_corpus_is_refused():
    with pytest.raises(ValueError, match="num_stories"):
        make_sea_corpus(0)


def test_command_line_prints_both_domains(capsys):
    main(["--max-steps", "2"])
    out = capsys.readouterr().out
    assert "new-domain perplexity" in out and "original perplexity" in out
