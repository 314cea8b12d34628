"""A byte-level BPE tokenizer trained on the lab's corpus, wrapped for transformers.

The same recipe as GPT-2's tokenizer (byte-level BPE), at a vocabulary of a few hundred
tokens instead of 50,257, so every common word of the corpus is one token. Wrapping it as a
``PreTrainedTokenizerFast`` gives it the interface of every Hugging Face tokenizer, so PEFT,
TRL and transformers' ``Trainer`` accept it unchanged.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT]

# A chat template turns a list of messages into one string. Each turn opens with its role
# token and closes with EOS, so a model that learned the template knows where to stop. The
# {% generation %} markers tell transformers (and TRL) which tokens are the assistant's, the
# only ones an instruction-tuned model is trained to predict.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|user|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers."""
    bpe = Tokenizer(models.BPE())
    # Byte-level: every string can be encoded, even words the corpus never used.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    # Like Llama's tokenizer, put BOS in front of every encoded text.
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
