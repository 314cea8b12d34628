"""Turning text into training batches: packing, chat formatting, padding.

Every batch in the lab is a dict of three tensors of shape (B, T):
``input_ids``; ``attention_mask`` (1 for real tokens, 0 for padding); and ``labels``, the
token each position should predict, or ``IGNORE_INDEX`` where no loss is taken (prompt
tokens, padding). Shifting labels by one position happens in the loss, as in transformers.
"""

import torch
from transformers import PreTrainedTokenizerBase

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


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The tokens of a one-turn chat up to where the assistant starts to answer."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """The tokens of an assistant's answer, closed by EOS as the chat template closes it."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_prompt_response(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> dict:
    """One supervised example: the whole chat as input, a loss on the response tokens only."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    answer_ids = response_ids(tokenizer, response)
    if len(answer_ids) < 2:  # EOS alone: nothing of the answer would be learned
        raise ValueError(f"empty response for prompt {prompt!r}: every label would be masked")
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return {"input_ids": prompt_ids + answer_ids, "labels": labels}


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
