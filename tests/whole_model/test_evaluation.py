"""The evaluate command: the five held-out numbers every page reports, from the lab's metrics."""

from fieldguide.lab.metrics import (
    context_outcomes,
    exact_match,
    heldout_perplexity,
    preference_accuracy,
    sentiment_accuracy,
)
from fieldguide.lab.tasks import context_task, instruction_task, preference_task, sentiment_task
from fieldguide.whole_model.evaluation import evaluate, main


def test_evaluate_reports_each_metric_on_its_heldout_split(tiny):
    scores = evaluate(*tiny)
    assert scores.sentiment_accuracy == sentiment_accuracy(*tiny, sentiment_task().heldout)
    assert scores.instruction_exact_match == exact_match(*tiny, instruction_task().heldout)
    assert scores.preference_accuracy == preference_accuracy(*tiny, preference_task().heldout)
    assert scores.heldout_perplexity == heldout_perplexity(*tiny)
    assert scores.context_accuracy == sum(context_outcomes(*tiny, context_task())) / len(context_task())


def test_the_command_prints_one_line_per_number(tiny, capsys):
    main([])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "sentiment_accuracy",
        "instruction_exact_match",
        "preference_accuracy",
        "heldout_perplexity",
        "context_accuracy",
    ]


def test_the_sentiment_task_ranks_four_methods():
    """Issue 8's headroom: at the default budgets the methods do not all tie, and none is perfect."""
    from fieldguide.whole_model.evaluation import pairwise_differences, rank_methods

    runs = rank_methods()
    assert max(run.after.value for run in runs.values()) < 1.0
    separated = [pair for pair, d in pairwise_differences(runs).items() if d.low > 0 or d.high < 0]
    assert separated, {name: str(run.after) for name, run in runs.items()}


def test_prompt_tuning_positions_are_dropped_before_scoring(tiny):
    """A soft prompt adds positions in front; the metrics and the loss must skip them."""
    from peft import PromptTuningConfig, get_peft_model

    from fieldguide.lab.experiment import frozen_copy
    from fieldguide.lab.metrics import sentiment_outcomes

    model, tokenizer = tiny
    tuned = get_peft_model(
        frozen_copy(model), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    examples = sentiment_task().heldout[:8]
    assert len(sentiment_outcomes(tuned, tokenizer, examples)) == 8
