"""Tiny stand-ins for real model families, built offline: the architecture at toy size, a
byte-level tokenizer trained here, and the family's special tokens and chat format.

The chat templates below, written here, render what the families' own templates render for
a conversation of user and assistant turns: Qwen2-Instruct's ChatML with its default system
prompt ("You are a helpful assistant."; Qwen2.5's names Qwen), Llama 3 Instruct's header
tokens and ``<|eot_id|>`` (Llama 3.1 and later add a system block with dates), and Gemma's
``<start_of_turn>`` with the assistant called ``model`` and ``<end_of_turn>`` while EOS is
``<eos>``. They leave out the branches for tools and system messages and Gemma's check that
roles alternate, which these tests do not exercise.
"""

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from fieldguide.lab.corpus import make_corpus
from fieldguide.lab.tasks import instruction_task

QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    config_class: type
    template: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str  # the tokenizer's EOS, as the instruct model ships it
    pad: str | None
    end_of_turn: str  # what closes an assistant turn
    named: bool = True  # the special tokens listed in additional_special_tokens


FAMILIES = {
    "llama3": Family(
        LlamaConfig,
        LLAMA3_TEMPLATE,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,  # Llama 3 ships no pad token
        end_of_turn="<|eot_id|>",
    ),
    # The base model's tokenizer: EOS ends a text, not a turn, and <|eot_id|> is special without
    # being named. It is given the instruct template, as --chat-template would give it.
    "llama3-base": Family(
        LlamaConfig,
        LLAMA3_TEMPLATE,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad=None,
        end_of_turn="<|eot_id|>",
        named=False,
    ),
    "qwen2": Family(
        Qwen2Config,
        QWEN2_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,  # Qwen has no BOS
        eos="<|im_end|>",
        pad="<|endoftext|>",
        end_of_turn="<|im_end|>",
    ),
    "gemma": Family(
        GemmaConfig,
        GEMMA_TEMPLATE,
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",  # not the end of a turn: that is <end_of_turn>
        pad="<pad>",
        end_of_turn="<end_of_turn>",
    ),
}


def family_tokenizer(name: str, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the family's special tokens (and its chat template).

    The special tokens are added tokens marked special; a family with ``named=False`` leaves
    them out of ``additional_special_tokens``, as Llama 3's base tokenizer does.
    """
    family = FAMILIES[name]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prompts = [ex.prompt for ex in instruction_task().train[:200]]
    bpe.train_from_iterator(make_corpus(200) + prompts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad
    )
    if family.named:
        tokenizer.add_special_tokens({"additional_special_tokens": list(family.special_tokens)})
    tokenizer.chat_template = family.template if chat_template else None
    return tokenizer


def save_family_model(name: str, directory: Path, chat_template: bool = True) -> Path:
    """Build the family's architecture at toy size, with random weights, and save it with its tokenizer."""
    tokenizer = family_tokenizer(name, chat_template)
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    model = AutoModelForCausalLM.from_config(FAMILIES[name].config_class(**shape))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
