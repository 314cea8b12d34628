"""The metrics read the model the same way however the items are batched."""

import math

import pytest
import torch

from fieldguide.lab.chat import chat_prompt_ids, encode_chat
from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.data import pad_batch
from fieldguide.lab.metrics import (
    GREEDY,
    exact_match,
    exact_match_outcomes,
    generate_responses,
    sequence_logprobs,
    text_losses,
)
from fieldguide.lab.tasks import instruction_task
from fieldguide.lab.training import causal_lm_loss


def test_sequence_logprobs_are_the_same_in_a_padded_batch_and_alone(micro_model, micro_tokenizer):
    examples = [encode_chat(micro_tokenizer, ex.prompt, ex.response) for ex in instruction_task().train[:6]]
    assert len({len(ex["input_ids"]) for ex in examples}) > 1  # so the batch needs padding
    together = sequence_logprobs(micro_model, examples, batch_size=6)
    alone = torch.cat([sequence_logprobs(micro_model, [ex]) for ex in examples])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)


def test_text_losses_are_each_texts_mean_next_token_loss(micro_model, micro_tokenizer):
    texts = make_corpus(3, seed=5)
    for text, loss in zip(texts, text_losses(micro_model, micro_tokenizer, texts), strict=True):
        ids = micro_tokenizer(text)["input_ids"]
        with torch.no_grad():
            loss_sum, count = causal_lm_loss(micro_model, pad_batch([{"input_ids": ids, "labels": ids}], 0))
        assert math.isclose(loss, loss_sum.item() / count, rel_tol=1e-5)


def test_batched_generation_with_left_padding_matches_one_prompt_at_a_time(micro_model, micro_tokenizer):
    prompts = [ex.prompt for ex in instruction_task().heldout[:5]]
    batched = generate_responses(micro_model, micro_tokenizer, prompts, max_new_tokens=6)
    alone = [generate_responses(micro_model, micro_tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone


def test_exact_match_is_the_mean_of_its_outcomes(tiny):
    examples = instruction_task().heldout[:20]
    outcomes = exact_match_outcomes(*tiny, examples)
    assert set(outcomes) <= {0, 1} and len(outcomes) == 20
    assert exact_match(*tiny, examples) == pytest.approx(sum(outcomes) / 20)


def test_a_shipped_repetition_penalty_does_not_change_the_answers(micro_model, micro_tokenizer):
    """Scoring decodes greedily whatever the model's generation_config says."""
    prompts = [ex.prompt for ex in instruction_task().heldout[:5]]
    plain = generate_responses(micro_model, micro_tokenizer, prompts, max_new_tokens=6)
    micro_model.generation_config.repetition_penalty = 10.0  # as a model could ship it
    assert generate_responses(micro_model, micro_tokenizer, prompts, max_new_tokens=6) == plain
    # ... while a call that leaves the penalty to the model's config answers differently:
    input_ids = torch.tensor([chat_prompt_ids(micro_tokenizer, prompts[0])])
    shipped = micro_model.generate(input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    greedy = micro_model.generate(input_ids, max_new_tokens=6, pad_token_id=0, **GREEDY)
    assert not torch.equal(shipped, greedy)
