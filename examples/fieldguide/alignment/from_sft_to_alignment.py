"""From instruction tuning to alignment: the pipeline every alignment page continues.

The lab's alignment task (``fieldguide.lab.preferences``) starts where InstructGPT's second
and third steps start: from a model fine-tuned on demonstrations. This module records that
first step's run, and turns labellers' rankings into the pairs that reward models and DPO
train on. Run it to see the SFT policy's answers::

    fieldguide from-sft-to-alignment
"""

import itertools

from fieldguide.lab.cli import TINY, example_parser, main_guard, positive_int
from fieldguide.lab.metrics import generate_responses
from fieldguide.lab.preferences import MAX_NEW_TOKENS, alignment_task, read_review, sft_policy_run
from fieldguide.lab.records import recorded
from fieldguide.lab.tasks import PreferenceExample


def rankings_to_pairs(prompt: str, ranking: list[str]) -> list[PreferenceExample]:
    """Every pair a ranking implies, best first: K responses give K(K-1)/2 pairs, each with the
    better-ranked response as chosen (InstructGPT's comparisons)."""
    if len(set(ranking)) != len(ranking):
        raise ValueError("a ranking lists each response once")
    return [PreferenceExample(prompt, better, worse) for better, worse in itertools.combinations(ranking, 2)]


@recorded
def run_sft_policy():
    """The SFT policy's run: its numbers, recorded (the model stays in the local cache)."""
    return sft_policy_run()


def main(argv: list[str] | None = None) -> None:
    parser = example_parser(
        "Show the SFT policy's answers to held-out requests, and what the lab's rule makes of them.",
        model_help="only the lab's tiny model: the SFT policy is fine-tuned from it",
    )
    parser.add_argument("--count", type=positive_int, default=8, help="how many held-out requests to answer")
    args = parser.parse_args(argv)
    if args.model != TINY:
        parser.error("argument --model: the SFT policy is the tiny model's")
    print("The SFT policy: the tiny model fine-tuned on the demonstrations (about a minute, once).")
    run = sft_policy_run()
    print("Its answers to held-out requests, each judged by the rule: (good) or (bad) review,")
    print("or (not a review as asked).\n")
    requests = alignment_task().requests.heldout[: args.count]
    answers = generate_responses(run.model, run.tokenizer, [r.prompt for r in requests], MAX_NEW_TOKENS)
    verdicts = {1: "good", 0: "bad", None: "not a review as asked"}
    for request, answer in zip(requests, answers, strict=True):
        print(f"{request.prompt}\n    {answer}  ({verdicts[read_review(request, answer)]})")


if __name__ == "__main__":
    main_guard(main)
