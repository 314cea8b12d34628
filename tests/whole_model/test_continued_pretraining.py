"""Continued pretraining: the new domain's corpus, the replay mix, the errors."""

import copy
import dataclasses

import pytest
import torch

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.experiment import run_technique
from fieldguide.lab.loading import load_model
from fieldguide.whole_model import continued_pretraining
from fieldguide.whole_model.continued_pretraining import (
    ASKED_SAILORS,
    PRESETS,
    SAILOR_SHIPS,
    UNASKED_SAILORS,
    domain_adaptation,
    fact_outcomes,
    fact_question,
    main,
    make_sea_corpus,
    run_continued_pretraining,
    training_blocks,
)


def test_the_sea_corpus_is_reproducible_and_keeps_its_facts():
    stories = make_sea_corpus(50, seed=3)
    assert stories == make_sea_corpus(50, seed=3)
    for story in stories:
        sailor, ship = story.split(".")[0].removeprefix("the ").split(" sails the ")
        assert SAILOR_SHIPS[sailor] == ship


def test_the_sailors_split_into_an_asked_and_an_unasked_half():
    assert set(ASKED_SAILORS) | set(UNASKED_SAILORS) == set(SAILOR_SHIPS)
    assert not set(ASKED_SAILORS) & set(UNASKED_SAILORS)
    assert len(ASKED_SAILORS) == len(UNASKED_SAILORS)


def test_only_the_asked_sailors_are_asked_about_and_always_answered_rightly():
    stories = make_sea_corpus(600, seed=0)
    for sailor, ship in SAILOR_SHIPS.items():
        question = fact_question(sailor)
        asked = [story for story in stories if question in story]
        assert all(f"{question} {ship}." in story for story in asked)
        assert bool(asked) == (sailor in ASKED_SAILORS)


# (index of the ship the scores favour, for each probed sailor) -> the outcomes
@pytest.mark.parametrize(
    ("sailors", "favoured", "expected"),
    [
        (("captain", "pirate"), [0, 1], [1, 1]),  # each sailor's own ship: galleon, schooner
        (("captain", "pirate"), [1, 0], [0, 0]),  # the ships swapped
        (("captain", "pirate"), [0, 0], [1, 0]),  # the same ship for both
        (("explorer",), [11], [1]),  # the last ship, dinghy
    ],
)
def test_the_fact_probe_picks_the_likeliest_ship(monkeypatch, tiny, sailors, favoured, expected):
    ships = len(SAILOR_SHIPS)

    def fake_logprobs(model, examples):
        assert len(examples) == len(sailors) * ships  # every ship, for every sailor
        scores = torch.full((len(sailors), ships), -5.0)
        scores[range(len(sailors)), favoured] = -1.0
        return scores.flatten()

    monkeypatch.setattr(continued_pretraining, "sequence_logprobs", fake_logprobs)
    assert fact_outcomes(tiny[0], tiny[1], sailors) == expected


def test_the_fact_probe_scores_each_ship_after_the_question(tiny):
    model, tokenizer = tiny
    outcomes = fact_outcomes(model, tokenizer, UNASKED_SAILORS)
    assert len(outcomes) == len(UNASKED_SAILORS) and set(outcomes) <= {0, 1}


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


def test_continued_pretraining_teaches_the_asked_facts(tiny):
    # 60 steps teach no fact (the page shows it); 400, the page's cached run, teach the asked half
    before = fact_outcomes(*tiny, ASKED_SAILORS)
    after = fact_outcomes(run_continued_pretraining(max_steps=400).model, tiny[1], ASKED_SAILORS)
    assert sum(after) > sum(before) + len(ASKED_SAILORS) / 2


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


def test_command_line_prints_both_domains_and_saves(tiny, tmp_path, capsys):
    main(["--max-steps", "2", "--output", str(tmp_path / "sea")])
    out = capsys.readouterr().out
    assert "new-domain perplexity" in out and "original perplexity" in out
    assert f"saved to {tmp_path / 'sea'}" in out
    assert changed_weights(tmp_path / "sea", tiny[0])  # what was trained, not the base model


def changed_weights(directory, base) -> list[str]:
    """The weights of the model saved in ``directory`` that differ from ``base``'s."""
    saved, _ = load_model(directory)
    return [name for name, weight in saved.state_dict().items() if not weight.equal(base.state_dict()[name])]
