"""What the alignment pages align to: a preference no demonstration taught, and a rule to judge it.

Asked ``write a review of the pie that starts with stale.``, a model should answer with a
review of the pie whose first taste word is "stale", in the review grammar of ``fieldguide.lab.reviews``. Supervised
fine-tuning on demonstrations teaches that format, and the demonstrations are good and bad
reviews alike, so the fine-tuned model (the *SFT policy*, where every alignment page starts)
writes a good review about half the time. The preference is for a good one. With a bad word
that takes some composition: "not stale", or "stale but sweet", since "but" lets its second
clause decide; "stale" alone, or "stale and cold", is the format without the preference.

``judge`` is the rule: it reads the response with the grammar, no model involved, so a page can
show a policy improving by a measure that no learned reward wrote. Requests are (food, word)
pairs, and held-out requests are pairs that no training demonstration or preference pair uses;
held-out preference pairs are also built from held-out reviews only (``review_split``).
"""

import functools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fieldguide.lab.cache import cached
from fieldguide.lab.chat import (
    chat_prompt_ids,
    encode_chat,
    encode_instructions,
    response_prefix,
    stop_token_ids,
)
from fieldguide.lab.corpus import FOODS
from fieldguide.lab.data import IGNORE_INDEX
from fieldguide.lab.experiment import Technique, frozen_copy, run_technique
from fieldguide.lab.loading import load_model
from fieldguide.lab.memory import check_fits, static_training_bytes, weight_bytes
from fieldguide.lab.metrics import generate_responses
from fieldguide.lab.reviews import BAD_TASTES, GOOD_TASTES, clause_free, clause_label, review_split
from fieldguide.lab.tasks import InstructionExample, PreferenceExample, Split, split_by_key
from fieldguide.lab.training import TrainConfig

REQUEST = "write a review of the {food} that starts with {word}."
MAX_NEW_TOKENS = 24  # longer than any review of the grammar, so a cut answer is the model's fault


@dataclass(frozen=True)
class ReviewRequest:
    food: str
    word: str  # the taste word the review must start with, negated or not

    @property
    def prompt(self) -> str:
        return REQUEST.format(food=self.food, word=self.word)


def review_requests(heldout_share: float = 0.3, seed: int = 0) -> Split[ReviewRequest]:
    """Every (food, taste word) request, with a random ``heldout_share`` of them held out."""
    requests = [ReviewRequest(food, word) for food in FOODS for word in GOOD_TASTES + BAD_TASTES]
    return split_by_key(requests, lambda r: (r.food, r.word), heldout_share, seed)


def review_label(review: str) -> int | None:
    """The sentiment of ``review`` by the grammar's rule, read clause by clause; None if it is
    not a review of the grammar.

    A clause is a taste word, maybe after "not"; "and" must join clauses that agree and "but"
    clauses that differ; the last clause decides; no word is used twice. The same rule
    ``fieldguide.lab.reviews`` builds its reviews by, so the two agree on every one of them.
    """
    words, clauses, joiners = review.split(), [], []
    while words:
        negated = words[0] == "not"
        word = words[1] if negated and len(words) > 1 else words[0]
        if word not in GOOD_TASTES + BAD_TASTES:
            return None
        clauses.append(clause_label((negated, word)))
        words = words[2 if negated else 1 :]
        if words:
            if words[0] not in ("and", "but") or len(words) == 1:
                return None
            joiners.append(words.pop(0))
    tastes = [w for w in clause_free(review).split() if w not in ("and", "but")]
    if not clauses or len(set(tastes)) != len(tastes):
        return None
    for first, second, joiner in zip(clauses[:-1], clauses[1:], joiners, strict=True):
        if (joiner == "and") != (first == second):
            return None
    return clauses[-1]


def _first_word(review: str) -> str:
    """The taste word of a review's first clause: "stale" in "not stale but sweet"."""
    return clause_free(review).split()[0]


def _reviews_with(word: str, reviews: list[tuple[str, int]]) -> dict[int, list[str]]:
    """The reviews among ``reviews`` that start with ``word``, by label."""
    found = {0: [], 1: []}
    for text, label in reviews:
        if _first_word(text) == word:
            found[label].append(text)
    return found


# -- The rule ---------------------------------------------------------------------------------


def read_review(request: ReviewRequest, response: str) -> int | None:
    """The label of ``response`` as a review of the food asked about that starts with the word
    asked for; None if it is not one (another food, another word, not in the grammar)."""
    head = f"the {request.food} is "
    text = response.strip().removesuffix(".")
    if not text.startswith(head):
        return None
    review = text[len(head) :]
    label = review_label(review)
    if label is None or _first_word(review) != request.word:
        return None
    return label


def judge(request: ReviewRequest, response: str) -> int:
    """1 if ``response`` is a good review of the food, starting with the word; else 0: the rule
    that no model wrote."""
    return int(read_review(request, response) == 1)


def answer_labels(model, tokenizer, requests: list[ReviewRequest]) -> list[int | None]:
    """``read_review`` of the model's greedy answer to each request: 1, 0, or None if ill-formed."""
    answers = generate_responses(model, tokenizer, [r.prompt for r in requests], MAX_NEW_TOKENS)
    return [read_review(r, a) for r, a in zip(requests, answers, strict=True)]


def rule_outcomes(model, tokenizer, requests: list[ReviewRequest]) -> list[int]:
    """The rule's verdict on the model's greedy answer to each request (``judge``)."""
    return [int(label == 1) for label in answer_labels(model, tokenizer, requests)]


def well_formed_share(model, tokenizer, requests: list[ReviewRequest]) -> float:
    """The share of greedy answers that are reviews as asked, good or bad: the format alone."""
    labels = answer_labels(model, tokenizer, requests)
    return sum(label is not None for label in labels) / len(labels)


# -- Demonstrations and preferences -----------------------------------------------------------


def demonstrations(
    requests: list[ReviewRequest], per_request: int = 12, seed: int = 0
) -> list[InstructionExample]:
    """Reviews that answer each request, good and bad alike: the format, not the preference."""
    rng = random.Random(seed)
    train_reviews = review_split()[0]
    out = []
    for request in requests:
        found = _reviews_with(request.word, train_reviews)
        for i in range(per_request):
            review = rng.choice(found[i % 2])  # alternate the label: half good, half bad
            out.append(InstructionExample(request.prompt, f"the {request.food} is {review}"))
    return rng.sample(out, len(out))


def preference_pairs(
    requests: list[ReviewRequest], reviews: list[tuple[str, int]], per_request: int, seed: int
) -> list[PreferenceExample]:
    """For each request, ``per_request`` pairs: a good review, chosen over a bad one, both as asked."""
    rng = random.Random(seed)
    out = []
    for request in requests:
        found = _reviews_with(request.word, reviews)
        if not found[0] or not found[1]:
            raise ValueError(f"no good and bad review start with {request.word!r} among the reviews given")
        for _ in range(per_request):
            good, bad = rng.choice(found[1]), rng.choice(found[0])
            out.append(
                PreferenceExample(
                    request.prompt, f"the {request.food} is {good}", f"the {request.food} is {bad}"
                )
            )
    return rng.sample(out, len(out))


@dataclass(frozen=True)
class AlignmentTask:
    requests: Split[ReviewRequest]  # held-out requests are scored by the rule
    demonstrations: list[InstructionExample]  # the SFT data: training requests, either sentiment
    pairs: Split[PreferenceExample]  # training pairs from training reviews; held-out from held-out ones


@functools.cache
def alignment_task(seed: int = 0) -> AlignmentTask:
    """The requests, the demonstrations and the preference pairs every alignment page uses."""
    requests = review_requests(seed=seed)
    train_reviews, heldout_reviews = review_split()
    return AlignmentTask(
        requests=requests,
        demonstrations=demonstrations(requests.train, seed=seed),
        pairs=Split(
            train=preference_pairs(requests.train, train_reviews, per_request=8, seed=seed),
            heldout=preference_pairs(requests.heldout, heldout_reviews, per_request=4, seed=seed + 1),
        ),
    )


# -- The reference: the model a policy is held to --------------------------------------------


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen reference beside ``model``: a copy in bfloat16 on a GPU, where it only answers.

    Refuses, before copying, a pair of models that would not fit: the policy's weights,
    gradients and AdamW state, and the reference's weights.
    """
    if next(model.parameters()).device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(next(model.parameters()).device)
        reference_bytes = sum(p.numel() for p in model.parameters()) * 2  # bfloat16
        check_fits(
            static_training_bytes(model) + reference_bytes,
            free + weight_bytes(model),
            what="training this model beside a frozen reference",
            needs="the policy's weights, gradients and AdamW state and the reference's bfloat16 weights",
        )
        return frozen_copy(model).to(torch.bfloat16)
    return frozen_copy(model)


# -- The SFT policy: where alignment starts ---------------------------------------------------

SFT_CONFIG = TrainConfig(max_steps=1000, batch_size=32, learning_rate=1e-3, warmup_steps=10)


@cached
def sft_policy_run():
    """Supervised fine-tuning of the tiny model on the demonstrations; the run keeps the model."""
    model, tokenizer = load_model("tiny")
    task = alignment_task()
    technique = Technique(
        data=lambda tok: encode_instructions(tok, task.demonstrations),
        score=lambda m, tok: rule_outcomes(m, tok, task.requests.heldout),
    )
    return run_technique(technique, model, tokenizer, SFT_CONFIG, keep_model=True)


# -- Pairs as batches, the layout TRL's preference trainers use -------------------------------


def encode_pair(tokenizer, pair: PreferenceExample) -> dict:
    """The prompt's tokens and each response's (its end-of-turn token included), as lists."""
    prefix = response_prefix(tokenizer)
    chosen, rejected = (
        encode_chat(tokenizer, pair.prompt, prefix + text) for text in (pair.chosen, pair.rejected)
    )
    prompt_length = chosen["labels"].index(next(t for t in chosen["labels"] if t != IGNORE_INDEX))
    return {
        "prompt_ids": chosen["input_ids"][:prompt_length],
        "chosen_ids": _learned(chosen),
        "rejected_ids": _learned(rejected),
    }


def _learned(encoded: dict) -> list[int]:
    return [t for t in encoded["labels"] if t != IGNORE_INDEX]


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(2B, T) rows, the B chosen sequences then the B rejected ones, right-padded;
    ``completion_mask`` marks the response tokens whose log-probabilities count."""
    rows = [ex["prompt_ids"] + ex[side] for side in ("chosen_ids", "rejected_ids") for ex in examples]
    masks = [
        [0] * len(ex["prompt_ids"]) + [1] * len(ex[side])
        for side in ("chosen_ids", "rejected_ids")
        for ex in examples
    ]
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks]),
    }


def token_logprobs(model, batch: dict) -> torch.Tensor:
    """log pi(token | the tokens before it) for every response token, 0 elsewhere: (N, T - 1).

    Rows may be padded on the right (pairs) or on the left (sampled prompts): with the
    batch's ``position_ids``, if it has them, left-padded rows see the positions they had
    while being generated.
    """
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
    ).logits
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
    picked = logprobs.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked * batch["completion_mask"][:, 1:]


def completion_logprobs(model, batch: dict) -> torch.Tensor:
    """log pi(response | prompt) of each row: its response tokens' log-probabilities, summed. (N,)"""
    return token_logprobs(model, batch).sum(dim=-1)


# -- Sampling: the rollouts of the methods that generate while they train ---------------------


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompts: list[str], num_samples: int = 1, max_new_tokens: int = MAX_NEW_TOKENS
) -> dict:
    """``num_samples`` responses to each prompt, sampled at temperature 1 from ``model``.

    Returns a batch for ``token_logprobs``: the left-padded prompts and their responses
    (``input_ids``, ``attention_mask``, ``position_ids``), ``completion_mask`` over each
    response up to and including the token that ends its turn, and the decoded ``responses``.
    Rows are grouped by prompt: rows ``i * num_samples`` to ``(i + 1) * num_samples - 1``
    answer prompt ``i``.
    """
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts for _ in range(num_samples)]
    width = max(map(len, encoded))
    device = next(model.parameters()).device
    input_ids = torch.tensor(
        [[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded], device=device
    )
    prompt_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    stops = stop_token_ids(tokenizer)
    sequences = model.generate(
        input_ids=input_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops,
        **sampling,
    )
    completion = sequences[:, width:]
    # A response ends at its first stop token, which counts; what generate pads after it does not.
    stopped = torch.isin(completion, torch.tensor(stops, device=device))
    after_stop = (stopped.long().cumsum(dim=1) - stopped.long()) > 0
    completion_mask = (~after_stop).long()
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return {
        "input_ids": sequences,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        "completion_mask": torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1),
        "responses": [
            text.strip()
            for text in tokenizer.batch_decode(
                completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id), skip_special_tokens=True
            )
        ],
    }


@torch.no_grad()
def sampled_kl(policy, reference, tokenizer, prompts: list[str], num_samples: int = 8) -> float:
    """KL(policy || reference) over whole responses, estimated from the policy's own samples:
    the mean of log pi(y | x) - log pi_ref(y | x), in nats per response."""
    batch = sample_responses(policy, tokenizer, prompts, num_samples)
    tensors = {key: value for key, value in batch.items() if key != "responses"}
    log_ratios = []
    # 64 rows at a time: the logits of every row at once (rows x length x vocabulary floats)
    # would take tens of gigabytes for a real model's vocabulary of 150,000 tokens.
    for start in range(0, len(batch["responses"]), 64):
        rows = {key: value[start : start + 64] for key, value in tensors.items()}
        log_ratios.append(completion_logprobs(policy, rows) - completion_logprobs(reference, rows))
    return float(torch.cat(log_ratios).mean())
