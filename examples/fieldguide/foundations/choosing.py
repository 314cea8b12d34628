"""Adapting a model without training it: zero-shot and few-shot prompts, and retrieval.

Prompting is the baseline every fine-tune has to beat. A k-shot prompt puts k solved
examples (demonstrations) in front of the question, and the model is scored exactly as the
lab's zero-shot ``sentiment_accuracy`` scores it: by which label word it finds more likely.
k = 0 is the zero-shot prompt itself. Run it on the tiny model or on any causal LM::

    python -m fieldguide.foundations.choosing --model tiny --shots 2
"""

import random
import re

from fieldguide.lab.cli import example_parser, main_guard, non_negative_int, positive_int
from fieldguide.lab.corpus import ANIMAL_HOMES, PLACES, today_fact, today_question
from fieldguide.lab.data import encode_completion
from fieldguide.lab.loading import parse_and_load
from fieldguide.lab.metrics import label_predictions, place_answers
from fieldguide.lab.tasks import (
    SENTIMENT_LABELS,
    ClassificationExample,
    label_word,
    sentiment_prompt,
    sentiment_task,
)


def few_shot_prompt(examples: list[ClassificationExample], query: str, k: int) -> str:
    """The first ``k`` examples, each followed by its label word, then ``query`` to be labelled."""
    if not 0 <= k <= len(examples):
        raise ValueError(f"k must be between 0 and the {len(examples)} examples given, got {k}")
    # A demonstration is the zero-shot prompt completed with the right answer, so the query
    # at the end reads as one more item of the same list.
    shots = [f"{sentiment_prompt(ex.text)}{label_word(ex.label)}." for ex in examples[:k]]
    return " ".join([*shots, sentiment_prompt(query)])


def check_fits(model, num_tokens: int, what: str) -> None:
    """Refuse a sequence longer than the context window instead of scoring garbage."""
    window = model.config.max_position_embeddings
    if num_tokens > window:
        raise ValueError(
            f"{what} takes {num_tokens} tokens, more than the model's context window of {window}: "
            "use fewer shots"
        )


def few_shot_predictions(
    model, tokenizer, train_examples: list[ClassificationExample], texts: list[str], k: int, seed: int = 0
) -> list[int]:
    """The label each text gets from a k-shot prompt, demonstrations drawn afresh per text."""
    if not 0 <= k <= len(train_examples):
        raise ValueError(f"k must be between 0 and the {len(train_examples)} training examples, got {k}")
    rng = random.Random(seed)
    # New random demonstrations for every query, as GPT-3's evaluation drew them.
    prompts = [few_shot_prompt(rng.sample(train_examples, k) if k else [], text, k) for text in texts]
    for prompt in prompts:  # with either label word after it, each must fit the context window
        for label in range(len(SENTIMENT_LABELS)):
            length = len(encode_completion(tokenizer, prompt, label_word(label))["input_ids"])
            check_fits(model, length, f"a {k}-shot prompt with its label")
    return label_predictions(model, tokenizer, prompts)


def few_shot_sentiment_accuracy(
    model,
    tokenizer,
    train_examples: list[ClassificationExample],
    heldout: list[ClassificationExample],
    k: int,
    seed: int = 0,
) -> float:
    """Accuracy on ``heldout`` of k-shot prompts built from ``train_examples``; chance is 0.5."""
    if not heldout:
        raise ValueError("there are no held-out examples to score")
    predicted = few_shot_predictions(model, tokenizer, train_examples, [ex.text for ex in heldout], k, seed)
    return sum(p == ex.label for p, ex in zip(predicted, heldout, strict=True)) / len(heldout)


def words(text: str) -> set[str]:
    """The lower-cased words of ``text``, punctuation dropped."""
    return set(re.findall(r"[a-z]+", text.lower()))


def retrieve(documents: list[str], query: str, k: int = 1) -> list[str]:
    """The ``k`` documents sharing the most words with ``query``: the retriever of RAG, by hand.

    Real systems rank by BM25 or by dense embeddings; word overlap is the same idea, small.
    """
    if not documents:
        raise ValueError("there are no documents to retrieve from")
    query_words = words(query)
    ranked = sorted(documents, key=lambda doc: len(words(doc) & query_words), reverse=True)
    return ranked[:k]  # sorted() is stable: among equal scores, the earlier document wins


def note_store(rng: random.Random) -> dict[str, str]:
    """One day's notes: where each animal is today, never its home. Returns animal -> note."""
    return {
        animal: today_fact(animal, rng.choice([p for p in PLACES if p != home]))
        for animal, home in ANIMAL_HOMES.items()
    }


def retrieval_outcomes(
    model, tokenizer, num_days: int = 20, seed: int = 0, k: int = 1
) -> tuple[list[int], list[int]]:
    """Where is each animal today? Answered without notes, then with the ``k`` notes retrieved.

    Each day puts every animal somewhere new and asks about each: ``num_days`` times ten
    questions. Returns per-question outcomes (1 right, 0 wrong), without and with retrieval.
    """
    rng = random.Random(seed)
    questions, with_note, answers = [], [], []
    for _ in range(num_days):
        notes = note_store(rng)
        for animal, note in notes.items():
            question = today_question(animal)
            questions.append(question)
            found = retrieve(list(notes.values()), question, k)  # the asked animal's note first
            with_note.append(" ".join([*found, question]))
            answers.append(note.rsplit(" ", 1)[1].rstrip("."))  # the note's place
    without = [int(a == b) for a, b in zip(place_answers(model, tokenizer, questions), answers, strict=True)]
    helped = [int(a == b) for a, b in zip(place_answers(model, tokenizer, with_note), answers, strict=True)]
    return without, helped


# The decision diagram on the page: each question, and what a "yes" to it points to.
DECISIONS = [
    (
        "Does it need facts it cannot know:\nfresh, private, or too many to learn?",
        "Retrieval (RAG)\nfetch the facts into the prompt",
    ),
    ("Do instructions and a few examples\nin the prompt do well enough?", "Prompting\nzero- or few-shot"),
    (
        "Is the gap behaviour (a format, a style,\na skill), with examples to learn from?",
        "Fine-tuning\nLoRA first, full if it falls short",
    ),
]


# Text in the diagram: 10 pt is 13 px on screen at the figure's natural width, above the 10 px
# the site's figures keep to (tests/browser/test_figures.py).
FONT_SIZE = 10
GAP = 5  # points between a yes/no label and the arrow it names


def _box(text):
    """Where the box drawn around ``text`` is on the canvas, as a transform annotations accept.

    A text's own extent leaves out its box's padding; arrows and labels placed by it would
    start inside the box and touch its edge.
    """

    def extent(renderer):
        text.update_bbox_position_size(renderer)
        return text.get_bbox_patch().get_window_extent(renderer)

    return extent


def _connect(ax, start, end, start_at, end_at, label, horizontal):
    """An arrow from one box's edge to another's (fractions of each box), labelled at its middle."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    start_box, end_box = _box(start), _box(end)
    arrow = {"arrowstyle": "-|>", "color": plt.rcParams["text.color"], "shrinkA": 0, "shrinkB": 0}
    ax.annotate("", xy=end_at, xycoords=end_box, xytext=start_at, textcoords=start_box, arrowprops=arrow)

    def between(renderer):  # the arrow's two ends: its middle is (0.5, 0.5) of this box
        a, b = start_box(renderer), end_box(renderer)
        start_point = (a.x0 + start_at[0] * a.width, a.y0 + start_at[1] * a.height)
        return Bbox([start_point, (b.x0 + end_at[0] * b.width, b.y0 + end_at[1] * b.height)])

    # Above a horizontal arrow, beside a vertical one, with a gap to the line.
    if horizontal:
        offset, align = (0, GAP), {"ha": "center", "va": "bottom"}
    else:
        offset, align = (GAP, 0), {"ha": "left", "va": "center"}
    middle = {"xy": (0.5, 0.5), "xycoords": between, "xytext": offset, "textcoords": "offset points"}
    ax.annotate(label, **middle, fontsize=FONT_SIZE, **align)


def plot_decision_diagram(ax) -> None:
    """Draw the page's decision flowchart on ``ax``: three questions, each with its answer."""
    import matplotlib.pyplot as plt

    ink = plt.rcParams["text.color"]  # the theme's text colour: readable in light and dark
    question_box = {"boxstyle": "round,pad=0.6", "facecolor": "none", "edgecolor": ink}
    answer_box = {"boxstyle": "square,pad=0.6", "facecolor": "none", "edgecolor": ink, "linewidth": 2}
    ax.set_axis_off()
    above = None
    for row, (question, answer) in enumerate(DECISIONS):
        y = 0.86 - 0.36 * row  # rows from the top of the axes down
        ask = ax.text(0.25, y, question, ha="center", va="center", fontsize=FONT_SIZE, bbox=question_box)
        result = ax.text(0.79, y, answer, ha="center", va="center", fontsize=FONT_SIZE, bbox=answer_box)
        _connect(ax, ask, result, (1, 0.5), (0, 0.5), "yes", horizontal=True)
        if above is not None:
            _connect(ax, above, ask, (0.5, 0), (0.5, 1), "no", horizontal=False)
        above = ask


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Score zero-shot and k-shot prompts on the sentiment task's held-out split.")
    parser.add_argument(
        "--shots", type=non_negative_int, default=2, help="demonstrations per prompt (default: 2)"
    )
    parser.add_argument(
        "--num-heldout",
        type=positive_int,
        default=None,
        help="score only this many held-out reviews (default: all of them)",
    )
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    task = sentiment_task()
    heldout = task.heldout[: args.num_heldout]
    for k in sorted({0, args.shots}):
        accuracy = few_shot_sentiment_accuracy(model, tokenizer, task.train, heldout, k, args.seed)
        print(f"{k}-shot accuracy on {len(heldout)} held-out reviews: {accuracy:.3f} (chance: 0.5)")


if __name__ == "__main__":
    main_guard(main)
