"""Turning text into training batches: packing, chat formatting, padding.

Every batch in the lab is a dict of three tensors of shape (B, T):
``input_ids``; ``attention_mask`` (1 for real tokens, 0 for padding); and ``labels``, the
token each position should predict, or ``IGNORE_INDEX`` where no loss is taken (prompt
tokens, padding). Shifting labels by one position happens in the loss, as in transformers.
"""

from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from fieldguide.lab.corpus import make_corpus

# PyTorch's cross_entropy skips targets equal to -100; transformers and TRL use the same value.
IGNORE_INDEX = -100


def pack_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], block_size: int) -> list[dict]:
    """Concatenate tokenized texts, each ended by EOS, and cut them into equal blocks.

    Packing is how LLMs are pretrained: no padding is wasted, and EOS tells the model where
    one document ends and the next begins. The tail shorter than a block is dropped.
    """
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one block of {block_size}")
    return [{"input_ids": block, "labels": block} for block in blocks]


def encode_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> dict:
    """Plain text, no chat: the prompt, then the completion, with a loss on the completion only.

    The two are tokenized apart, so the completion's tokens are the same whatever prompt
    comes before it: what a verbalizer metric scores and a classifier-by-text learns.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise ValueError(f"empty completion for prompt {prompt[:40]!r}: every label would be masked")
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def with_replay(examples: list[dict], replay: Callable[[int], list[dict]], fraction: float) -> list[dict]:
    """``examples`` plus ``replay(n)``'s examples, chosen so that they make up ``fraction`` of the whole.

    Replay (rehearsal) mixes examples of an earlier distribution back into the training data,
    so that the loss itself penalises forgetting them.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the replay fraction must be in [0, 1), got {fraction}")
    num_replay = round(len(examples) * fraction / (1 - fraction))  # replay / (examples + replay) = fraction
    if num_replay == 0:
        return examples
    replayed = replay(num_replay)
    if len(replayed) < num_replay:
        raise ValueError(f"asked for {num_replay} replay examples, got {len(replayed)}")
    return examples + replayed[:num_replay]


def pad_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into one batch of tensors, each (B, T)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids, attention_mask, labels = [], [], []
    for ex in examples:
        gap = width - len(ex["input_ids"])
        input_ids.append(ex["input_ids"] + [pad_token_id] * gap)
        attention_mask.append([1] * len(ex["input_ids"]) + [0] * gap)
        labels.append(ex["labels"] + [IGNORE_INDEX] * gap)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "labels": torch.tensor(labels),
    }


def pretraining_blocks(
    tokenizer: PreTrainedTokenizerBase, num_blocks: int, block_size: int, seed: int
) -> list[dict]:
    """The first ``num_blocks`` packed blocks of the pretraining corpus drawn with ``seed``.

    ``make_corpus`` draws stories one after another from one seeded generator, so with the
    base model's pretraining seed these are the very stories it was pretrained on: replay.
    """
    stories = make_corpus(max(1, 2 * num_blocks), seed=seed)  # every story fills half a block or more
    blocks = pack_texts(tokenizer, stories, block_size)
    if len(blocks) < num_blocks:
        raise ValueError(
            f"{len(stories)} stories fill {len(blocks)} blocks of {block_size}, not {num_blocks}"
        )
    return blocks[:num_blocks]
