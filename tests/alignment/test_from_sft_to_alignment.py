"""The pipeline page's module: rankings become pairs, and its command shows the SFT policy."""

import math

import pytest

from fieldguide.alignment.from_sft_to_alignment import main, rankings_to_pairs


@pytest.mark.parametrize("size", [2, 3, 4, 9])
def test_a_ranking_of_k_gives_k_choose_2_pairs_each_better_over_worse(size):
    ranking = [f"answer {i}" for i in range(size)]  # best first
    pairs = rankings_to_pairs("a prompt", ranking)
    assert len(pairs) == math.comb(size, 2)
    assert all(ranking.index(p.chosen) < ranking.index(p.rejected) for p in pairs)
    assert {(p.chosen, p.rejected) for p in pairs} == {
        (ranking[i], ranking[j]) for i in range(size) for j in range(i + 1, size)
    }


def test_a_ranking_that_repeats_a_response_is_refused():
    with pytest.raises(ValueError, match="each response once"):
        rankings_to_pairs("a prompt", ["a", "b", "a"])


def test_the_command_prints_answers_with_the_rules_verdict(capsys):
    main(["--count", "2"])
    header, _, answers = capsys.readouterr().out.partition("\n\n")
    assert header.startswith("The SFT policy") and "judged by the rule" in header  # what it trains; a legend
    lines = answers.splitlines()
    assert len(lines) == 4 and lines[0].startswith("write a review of the")
    assert lines[1].rstrip().endswith(("(good)", "(bad)", "(not a review as asked)"))


@pytest.mark.parametrize("argv", [["--count", "0"], ["--model", "."]])
def test_bad_arguments_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "error: argument" in capsys.readouterr().err
