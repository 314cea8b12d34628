"""Next-token probabilities and generation, as a function and as a program."""

import subprocess
import sys

from fieldguide.lab.generate import continue_text, top_next_tokens


def test_top_next_tokens_are_sorted_probabilities(tiny):
    top = top_next_tokens(*tiny, "the duck lives in the", k=5)
    probabilities = [p for _, p in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1 + 1e-6
    assert top[0][0] == " lake"  # the corpus's fact: each animal has one home


def test_greedy_continuation_is_deterministic(tiny):
    assert continue_text(*tiny, "the fox", max_new_tokens=8) == continue_text(
        *tiny, "the fox", max_new_tokens=8
    )


def test_generate_runs_as_a_program(tiny):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fieldguide.lab.generate",
            "--prompt",
            "the owl lives in the",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines()[0].endswith("' tree'")
