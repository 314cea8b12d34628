"""The tiny base model: saved as safetensors, it learned its corpus, and starts near chance on every task."""

from fieldguide.lab.corpus import ANIMAL_HOMES, make_corpus
from fieldguide.lab.generate import top_next_tokens
from fieldguide.lab.loading import load_model
from fieldguide.lab.metrics import (
    context_outcomes,
    exact_match,
    perplexity,
    place_answers,
    preference_accuracy,
    sentiment_accuracy,
)
from fieldguide.lab.pretrain import PretrainConfig, pretraining_cost, tiny_model_dir
from fieldguide.lab.stats import paired_difference
from fieldguide.lab.tasks import context_task, instruction_task, preference_task, sentiment_task


def test_tiny_model_is_saved_as_safetensors_and_reloads(tiny):
    directory = tiny_model_dir()
    assert (directory / "model.safetensors").exists()
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.pt"))
    reloaded, _ = load_model(str(directory))
    model, _ = tiny
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert a.equal(b), name


def test_pretraining_cost_is_kept_with_the_model(tiny):
    """The page's pretraining time is the build's own: steps and tokens from the recipe."""
    cost, config = pretraining_cost(), PretrainConfig()
    assert cost["steps"] == config.train.max_steps
    assert cost["tokens"] == config.train.max_steps * config.train.batch_size * config.block_size
    assert 0 < cost["seconds"] < 600  # a wall-clock time, not a default left in place


def test_tiny_model_learned_the_corpus(tiny):
    model, tokenizer = tiny
    assert perplexity(model, tokenizer, make_corpus(100, seed=77)) < 3.0  # uniform guessing: ~460
    # Facts: after "the duck lives in the", the most likely token is the duck's home.
    right = sum(
        top_next_tokens(model, tokenizer, f"the {a} lives in the", k=1)[0][0] == f" {h}"
        for a, h in ANIMAL_HOMES.items()
    )
    assert right >= 8


# The base model has never seen the tasks' formats, so it must start near chance: otherwise
# the gains the technique pages report would not be the techniques' doing.
def test_base_model_is_near_chance_on_sentiment(tiny):
    assert abs(sentiment_accuracy(*tiny, sentiment_task().heldout) - 0.5) <= 0.15


def test_base_model_is_near_chance_on_preferences(tiny):
    assert abs(preference_accuracy(*tiny, preference_task().heldout) - 0.5) <= 0.15


def test_base_model_reads_its_context(tiny):
    """Issue 8, point 4: a held-out passage that says where an animal is today changes the answer."""
    examples = context_task()
    without = context_outcomes(*tiny, examples, with_passage=False)
    with_passage = context_outcomes(*tiny, examples, with_passage=True)
    gain, low, _ = paired_difference(without, with_passage)
    assert gain >= 0.3 and low > 0, (sum(without), sum(with_passage), len(examples))


def test_base_model_answers_the_home_without_a_passage(tiny):
    # The corpus's default: asked where an animal is today with nothing said, it is at home.
    examples = context_task()
    answers = place_answers(*tiny, [ex.question for ex in examples])
    at_home = sum(
        answer == ANIMAL_HOMES[ex.question.split()[3]] for answer, ex in zip(answers, examples, strict=True)
    )
    assert at_home / len(examples) >= 0.5


def test_base_model_cannot_follow_the_instructions(tiny):
    assert exact_match(*tiny, instruction_task().heldout) <= 0.05
