"""The alignment task: the rule, the splits, pairs as batches, and sampled rollouts."""

import pytest
import torch

from fieldguide.lab.chat import encode_chat, response_prefix
from fieldguide.lab.experiment import frozen_copy
from fieldguide.lab.metrics import sequence_logprobs
from fieldguide.lab.preferences import (
    ReviewRequest,
    alignment_task,
    collate_pairs,
    completion_logprobs,
    encode_pair,
    judge,
    preference_pairs,
    read_review,
    review_label,
    sample_responses,
    sampled_kl,
    token_logprobs,
)
from fieldguide.lab.reviews import heldout_keys, review_key, review_split

STALE_PIE = ReviewRequest("pie", "stale")

JUDGED = [  # response to "write a review of the pie that starts with stale.", label, verdict
    ("the pie is not stale", 1, 1),
    ("the pie is not stale.", 1, 1),  # a closing period is allowed
    ("  the pie is stale but sweet ", 1, 1),  # "but": the second clause decides
    ("the pie is stale", 0, 0),
    ("the pie is stale and cold", 0, 0),
    ("the pie is not stale but cold", 0, 0),
    ("the cake is not stale", None, 0),  # another food
    ("the pie is sweet and not stale", None, 0),  # starts with another word
    ("the pie is not stale but sweet", None, 0),  # "but" between two good clauses: not the grammar
    ("the pie is not stale and", None, 0),  # cut short
    ("", None, 0),
]


@pytest.mark.parametrize(("response", "label", "verdict"), JUDGED)
def test_the_rule_reads_a_review_with_the_grammar(response, label, verdict):
    assert read_review(STALE_PIE, response) == label
    assert judge(STALE_PIE, response) == verdict


def test_the_rule_reads_three_clause_reviews():
    assert judge(STALE_PIE, "the pie is stale and cold but sweet") == 1
    assert judge(STALE_PIE, "the pie is not stale but cold and dry") == 0


def test_held_out_requests_share_nothing_with_training():
    task = alignment_task()
    heldout = {r.prompt for r in task.requests.heldout}
    assert heldout and heldout.isdisjoint({r.prompt for r in task.requests.train})
    assert heldout.isdisjoint({ex.prompt for ex in task.demonstrations})
    assert heldout.isdisjoint({pair.prompt for pair in task.pairs.train})
    assert {pair.prompt for pair in task.pairs.heldout} == heldout


def test_held_out_pairs_use_held_out_reviews_only():
    train_reviews = {text for text, _ in review_split()[0]}
    for pair in alignment_task().pairs.heldout:
        for response in (pair.chosen, pair.rejected):
            review = response.split(" is ", 1)[1]
            assert review not in train_reviews
            assert review_key(review) in heldout_keys() or review.count(" but ") + review.count(" and ") == 2


def test_every_pair_prefers_what_the_rule_prefers():
    task = alignment_task()
    for pair in task.pairs.train + task.pairs.heldout:
        food, word = pair.prompt.split("the ", 1)[1].split(" that starts with ")
        request = ReviewRequest(food, word.rstrip("."))
        assert (judge(request, pair.chosen), judge(request, pair.rejected)) == (1, 0), pair


def test_demonstrations_teach_the_format_not_the_preference():
    task = alignment_task()
    verdicts = []
    for ex in task.demonstrations:
        food, word = ex.prompt.split("the ", 1)[1].split(" that starts with ")
        label = read_review(ReviewRequest(food, word.rstrip(".")), ex.response)
        assert label is not None, ex  # every demonstration is a well-formed answer
        verdicts.append(label)
    assert sum(verdicts) * 2 == len(verdicts)  # exactly half are good


def test_a_word_with_no_good_review_is_refused():
    with pytest.raises(ValueError, match="no good and bad review start with 'stale'"):
        preference_pairs([STALE_PIE], [("stale", 0)], per_request=1, seed=0)


def test_pair_log_probabilities_equal_the_labs_sequence_log_probabilities(tiny):
    model, tokenizer = tiny
    pairs = alignment_task().pairs.heldout[:5]
    batch = collate_pairs([encode_pair(tokenizer, p) for p in pairs], tokenizer.pad_token_id)
    ours = completion_logprobs(model, batch)
    prefix = response_prefix(tokenizer)
    chats = [encode_chat(tokenizer, p.prompt, prefix + p.chosen) for p in pairs]
    chats += [encode_chat(tokenizer, p.prompt, prefix + p.rejected) for p in pairs]
    assert torch.allclose(ours, sequence_logprobs(model, chats), atol=1e-4)


def test_sampled_responses_end_at_their_turn_and_score_as_if_unpadded(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    prompts = [r.prompt for r in alignment_task().requests.heldout[:3]]
    batch = sample_responses(model, tokenizer, prompts, num_samples=2, max_new_tokens=12)
    assert batch["input_ids"].shape[0] == 6 == len(batch["responses"])
    tensors = {k: v for k, v in batch.items() if k != "responses"}
    scores = token_logprobs(model, tensors).sum(dim=-1)
    for row in range(6):  # each row alone, with no padding at all, gives the same log-probability
        keep = batch["attention_mask"][row].bool()
        alone = {key: value[row : row + 1, keep] for key, value in tensors.items() if key != "position_ids"}
        assert torch.allclose(token_logprobs(model, alone).sum(), scores[row], atol=1e-4)
        completion = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        ends = (completion == tokenizer.eos_token_id).nonzero()
        assert len(ends) <= 1 and (len(ends) == 0 or ends[0] == len(completion) - 1)


def test_a_policy_is_at_kl_zero_from_itself(tiny):
    model, tokenizer = tiny
    prompts = [r.prompt for r in alignment_task().requests.heldout[:4]]
    assert sampled_kl(model, frozen_copy(model), tokenizer, prompts, num_samples=2) == 0.0


def test_the_rule_agrees_with_the_grammar_on_every_review_it_builds():
    train, heldout = review_split()
    assert all(review_label(text) == label for text, label in train + heldout)


@pytest.mark.parametrize(
    "review",
    ["stale stale", "not", "stale and", "and stale", "not not stale", "stale but sour", "fresh or stale"],
)
def test_the_rule_refuses_what_the_grammar_does_not_write(review):
    assert review_label(review) is None
