"""Metrics for the lab's tasks: log-probabilities, accuracy, exact match, perplexity.

All of them only read the model (``torch.no_grad``), work in batches, and run on whatever
device the model is on.
"""

import math

import torch
import torch.nn.functional as F

from fieldguide.data import IGNORE_INDEX, chat_prompt_ids, pack_texts, pad_batch, response_ids
from fieldguide.tasks import SENTIMENT_LABELS, ClassificationExample, InstructionExample, PreferenceExample

# How a base model is asked for a label without any training: the review, then a cue whose
# most likely continuation should be the label word (a "verbalizer").
SENTIMENT_PROMPT = "{text} overall, the review is"


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def sequence_logprobs(
    model, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 64
) -> torch.Tensor:
    """log p(completion | prompt) for each pair of token lists, summed over the completion."""
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id or 0
    examples = [
        {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}
        for p, c in zip(prompts, completions, strict=True)
    ]
    scores = []
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # position t scores token t+1
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        mask = targets != IGNORE_INDEX
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        scores.append((picked * mask).sum(dim=-1).cpu())
    return torch.cat(scores)


def classify_sentiment(model, tokenizer, texts: list[str]) -> list[int]:
    """Zero-shot labels: the label word the model finds more likely after the review."""
    prompts, completions = [], []
    for text in texts:
        prompt = tokenizer(SENTIMENT_PROMPT.format(text=text))["input_ids"]
        for label in SENTIMENT_LABELS:
            prompts.append(prompt)
            completions.append(tokenizer(" " + label, add_special_tokens=False)["input_ids"])
    scores = sequence_logprobs(model, prompts, completions).view(len(texts), len(SENTIMENT_LABELS))
    return scores.argmax(dim=-1).tolist()


def sentiment_accuracy(model, tokenizer, examples: list[ClassificationExample]) -> float:
    """Fraction of reviews whose zero-shot label is right; chance is 0.5."""
    predicted = classify_sentiment(model, tokenizer, [ex.text for ex in examples])
    return sum(p == ex.label for p, ex in zip(predicted, examples, strict=True)) / len(examples)


def preference_accuracy(model, tokenizer, examples: list[PreferenceExample]) -> float:
    """Fraction of pairs where the model gives the chosen response the higher likelihood."""
    prompts = [chat_prompt_ids(tokenizer, ex.prompt) for ex in examples]
    chosen = sequence_logprobs(model, prompts, [response_ids(tokenizer, ex.chosen) for ex in examples])
    rejected = sequence_logprobs(model, prompts, [response_ids(tokenizer, ex.rejected) for ex in examples])
    return (chosen > rejected).float().mean().item()


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
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def exact_match(model, tokenizer, examples: list[InstructionExample], max_new_tokens: int = 16) -> float:
    """Fraction of prompts whose greedy answer equals the reference exactly."""
    answers = generate_responses(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens)
    return sum(answer == ex.response for answer, ex in zip(answers, examples, strict=True)) / len(examples)


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
