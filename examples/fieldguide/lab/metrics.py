"""Metrics for the lab's tasks: log-probabilities, accuracy, exact match, perplexity.

All of them only read the model (``torch.no_grad``), work in batches, and run on whatever
device the model is on.
"""

import math

import torch
import torch.nn.functional as F

from fieldguide.lab.chat import chat_prompt_ids, encode_chat, response_prefix, stop_token_ids
from fieldguide.lab.corpus import HELDOUT_TEXT_SEED, PLACES, make_corpus
from fieldguide.lab.data import IGNORE_INDEX, encode_completion, pack_texts, pad_batch
from fieldguide.lab.tasks import (
    SENTIMENT_LABELS,
    ClassificationExample,
    ContextExample,
    InstructionExample,
    PreferenceExample,
    label_word,
    sentiment_prompt,
)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _mean(outcomes: list[float]) -> float:
    return sum(outcomes) / len(outcomes)


@torch.no_grad()
def sequence_logprobs(model, examples: list[dict], batch_size: int = 64) -> torch.Tensor:
    """log p(labelled tokens | the tokens before them) for each encoded example, summed."""
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id or 0
    scores = []
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["input_ids"].shape[1] :]  # drop a soft prompt's positions, if any
        targets = batch["labels"][:, 1:]  # position t scores token t+1
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        mask = targets != IGNORE_INDEX
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        scores.append((picked * mask).sum(dim=-1).cpu())
    return torch.cat(scores)


def label_logprobs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """log p(label word | prompt) for each prompt and each label word: (N, 2), "bad" then "good"."""
    examples = [
        encode_completion(tokenizer, prompt, label_word(label))
        for prompt in prompts
        for label in range(len(SENTIMENT_LABELS))
    ]
    return sequence_logprobs(model, examples).view(len(prompts), len(SENTIMENT_LABELS))


def label_predictions(model, tokenizer, prompts: list[str]) -> list[int]:
    """The label word (0 "bad" or 1 "good") the model finds more likely after each prompt."""
    return label_logprobs(model, tokenizer, prompts).argmax(dim=-1).tolist()


def classify_sentiment(model, tokenizer, texts: list[str]) -> list[int]:
    """Zero-shot labels: the label word the model finds more likely after the review."""
    return label_predictions(model, tokenizer, [sentiment_prompt(text) for text in texts])


def sentiment_outcomes(model, tokenizer, examples: list[ClassificationExample]) -> list[int]:
    """1 for each review whose zero-shot label is right, 0 for each that is wrong."""
    predicted = classify_sentiment(model, tokenizer, [ex.text for ex in examples])
    return [int(p == ex.label) for p, ex in zip(predicted, examples, strict=True)]


def sentiment_accuracy(model, tokenizer, examples: list[ClassificationExample]) -> float:
    """Fraction of reviews whose zero-shot label is right; chance is 0.5."""
    return _mean(sentiment_outcomes(model, tokenizer, examples))


def per_class_recall(model, tokenizer, examples: list[ClassificationExample]) -> dict[str, float]:
    """For each label, the fraction of its reviews labelled right: a model that answers one
    word to everything scores 1.0 on that class and 0.0 on the other."""
    predicted = classify_sentiment(model, tokenizer, [ex.text for ex in examples])
    recall = {}
    for label, name in enumerate(SENTIMENT_LABELS):
        of_class = [p for p, ex in zip(predicted, examples, strict=True) if ex.label == label]
        recall[name] = _mean([int(p == label) for p in of_class])
    return recall


def place_answers(model, tokenizer, prompts: list[str]) -> list[str]:
    """The place the model finds most likely after each prompt, of the corpus's ten."""
    examples = [encode_completion(tokenizer, prompt, " " + place) for prompt in prompts for place in PLACES]
    scores = sequence_logprobs(model, examples).view(len(prompts), len(PLACES))
    return [PLACES[i] for i in scores.argmax(dim=-1).tolist()]


def context_outcomes(
    model, tokenizer, examples: list[ContextExample], with_passage: bool = True
) -> list[int]:
    """1 for each question answered with the place the passage gives, asked with or without it."""
    prompts = [f"{ex.passage} {ex.question}" if with_passage else ex.question for ex in examples]
    answers = place_answers(model, tokenizer, prompts)
    return [int(answer == ex.answer) for answer, ex in zip(answers, examples, strict=True)]


def context_accuracy(model, tokenizer, examples: list[ContextExample]) -> float:
    """Fraction of questions answered with the passage's place, the passage in the prompt."""
    return _mean(context_outcomes(model, tokenizer, examples))


def preference_outcomes(model, tokenizer, examples: list[PreferenceExample]) -> list[int]:
    """1 for each pair whose chosen response the model finds more likely than the rejected one."""
    prefix = response_prefix(tokenizer)
    chosen = sequence_logprobs(
        model, [encode_chat(tokenizer, ex.prompt, prefix + ex.chosen) for ex in examples]
    )
    rejected = sequence_logprobs(
        model, [encode_chat(tokenizer, ex.prompt, prefix + ex.rejected) for ex in examples]
    )
    return (chosen > rejected).int().tolist()


def preference_accuracy(model, tokenizer, examples: list[PreferenceExample]) -> float:
    """Fraction of pairs where the model gives the chosen response the higher likelihood."""
    return _mean(preference_outcomes(model, tokenizer, examples))


# Plain greedy decoding, whatever the model ships in its generation_config: a repetition
# penalty (Qwen2.5-Instruct's, say) would mark down answers that copy words from the prompt,
# which is what the instruction task asks for. Every value is given, at transformers' own
# default where it does not apply, so that none is filled in from the model's.
GREEDY = {"do_sample": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": 50}


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy answers to one-turn chat prompts, cut at the end-of-turn token."""
    device = next(model.parameters()).device
    answers = []
    for chunk in _batches(prompts, batch_size):
        encoded = [chat_prompt_ids(tokenizer, prompt) for prompt in chunk]
        # Left padding, so every prompt ends at the same position and generation continues it.
        width = max(map(len, encoded))
        input_ids = torch.tensor(
            [[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded], device=device
        )
        attention_mask = (
            torch.arange(width, device=device)
            >= width - torch.tensor([len(e) for e in encoded], device=device)[:, None]
        ).long()
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            **GREEDY,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(tokenizer),  # the end of a turn, whichever token it is
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def exact_match_outcomes(
    model, tokenizer, examples: list[InstructionExample], max_new_tokens: int = 16
) -> list[int]:
    """1 for each prompt whose greedy answer equals the reference exactly, else 0."""
    answers = generate_responses(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens)
    return [int(answer == ex.response) for answer, ex in zip(answers, examples, strict=True)]


def exact_match(model, tokenizer, examples: list[InstructionExample], max_new_tokens: int = 16) -> float:
    """Fraction of prompts whose greedy answer equals the reference exactly."""
    return _mean(exact_match_outcomes(model, tokenizer, examples, max_new_tokens))


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], block_size: int = 128) -> float:
    """exp of the mean next-token loss over ``texts``, packed into blocks as in pretraining."""
    blocks = pack_texts(tokenizer, texts, block_size)
    total, count = 0.0, 0
    for chunk in _batches(blocks, 32):
        batch = {k: v.to(next(model.parameters()).device) for k, v in pad_batch(chunk, 0).items()}
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum"
        ).item()
        count += batch["labels"][:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def text_losses(model, tokenizer, texts: list[str]) -> list[float]:
    """Each text's mean next-token loss, in nats per token: a per-item score for any text."""
    examples = [{"input_ids": ids, "labels": ids} for ids in tokenizer(texts)["input_ids"]]
    logprobs = sequence_logprobs(model, examples)  # summed over every token but the first
    return [-float(lp) / (len(ex["input_ids"]) - 1) for lp, ex in zip(logprobs, examples, strict=True)]


def heldout_perplexity(model, tokenizer, num_stories: int = 200) -> float:
    """Perplexity on unseen stories of the pretraining distribution: forgetting shows here."""
    return perplexity(model, tokenizer, make_corpus(num_stories, seed=HELDOUT_TEXT_SEED))
