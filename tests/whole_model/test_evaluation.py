"""The evaluate command: the four held-out numbers every page reports, from the lab's metrics."""

from fieldguide.lab.metrics import exact_match, heldout_perplexity, preference_accuracy, sentiment_accuracy
from fieldguide.lab.tasks import instruction_task, preference_task, sentiment_task
from fieldguide.whole_model.evaluation import evaluate, main


def test_evaluate_reports_each_metric_on_its_heldout_split(tiny):
    scores = evaluate(*tiny)
    assert scores.sentiment_accuracy == sentiment_accuracy(*tiny, sentiment_task().heldout)
    assert scores.instruction_exact_match == exact_match(*tiny, instruction_task().heldout)
    assert scores.preference_accuracy == preference_accuracy(*tiny, preference_task().heldout)
    assert scores.heldout_perplexity == heldout_perplexity(*tiny)


def test_the_command_prints_one_line_per_number(tiny, capsys):
    main([])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "sentiment_accuracy",
        "instruction_exact_match",
        "preference_accuracy",
        "heldout_perplexity",
    ]
