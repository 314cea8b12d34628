"""Chats as training data: the prompt a model sees, the tokens it learns, where its turn ends.

A model's chat template decides all three, and the templates of model families differ: the
lab's tiny model ends a turn with its EOS token, Qwen2 with ``<|im_end|>``, Llama 3 with
``<|eot_id|>``, Gemma with ``<end_of_turn>`` (while Gemma's EOS is ``<eos>``). So nothing
here assumes a token: the end of an assistant turn is read off the template itself, by
rendering a turn and looking at what follows the answer.
"""

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fieldguide.lab.data import IGNORE_INDEX
from fieldguide.lab.tokenizer import CHAT_TEMPLATE

_ANSWER = "FIELDGUIDE_ANSWER"  # a stand-in answer, to find where the template puts it


def require_chat_template(tokenizer: PreTrainedTokenizerBase, template_file: Path | None = None) -> None:
    """Install ``template_file`` as the chat template, or refuse a tokenizer that has none.

    Base models often ship without one: fine-tuning them on chats needs a template given
    explicitly (``--chat-template``), usually the one of the same family's instruct model.
    """
    if template_file is not None:
        tokenizer.chat_template = Path(template_file).read_text()
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path!r} has no chat template, so a chat cannot be "
            "rendered for it: pass --chat-template FILE with a Jinja template (for a base model, "
            "the one of the same family's instruct model), or train on plain prompt-completion "
            "text instead of chats, as TRL's SFTTrainer also accepts"
        )


def response_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """What goes before every answer: a space for the lab's tokenizer, nothing for others.

    The lab's byte-level BPE spells " nut" as one token and "nut" at the start of a text as
    two ("nu", "t"); the space makes an answer's words the tokens the prompt used. Real
    models' templates put their own separator (a newline) before the answer.
    """
    return " " if tokenizer.chat_template == CHAT_TEMPLATE else ""


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn, as the chat template writes it."""
    require_chat_template(tokenizer)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _ANSWER}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    if _ANSWER not in text:
        raise ValueError("the chat template drops the assistant's answer: it cannot be trained on")
    after = text[text.index(_ANSWER) + len(_ANSWER) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids or not _is_special(tokenizer, ids[0]):
        raise ValueError(
            f"the chat template closes an assistant turn with {after[:20]!r}, not with a special "
            "token: a model fine-tuned on it would have no token at which to stop"
        )
    return ids[0]


def _is_special(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """A named special token, or an added token marked special (Llama 3's base tokenizer marks
    ``<|eot_id|>`` so without naming it among its special tokens)."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or (added is not None and added.special)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config=None) -> list[int]:
    """Where generation should stop: the end of a turn, EOS (a base model's end of text), and
    whatever the model's own generation config stops at (Llama 3.1 lists ``<|eom_id|>`` too):
    passing ``eos_token_id`` to ``generate`` replaces that list, so it is merged here."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id, *configured}
    return sorted(token for token in ids if token is not None)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The tokens of a one-turn chat up to where the assistant starts to answer."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def encode_chat(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> dict:
    """One supervised chat: every token as input, a loss on the answer and its end of turn only.

    The answer is what the full chat adds after the prompt with its generation cue; whatever
    the template writes after the end-of-turn token (Qwen's newline, say) is masked, since
    the model stops before it.
    """
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template renders the prompt differently once an answer follows it, so the "
            "answer's tokens cannot be told apart from the prompt's"
        )
    answer = full[len(prompt_ids) :]
    end = end_of_turn_id(tokenizer)
    if end not in answer:
        raise ValueError(f"the rendered chat never closes the assistant's turn for prompt {prompt[:40]!r}")
    learned = answer.index(end) + 1  # the answer's tokens and the end of turn; not what follows
    if learned < 2:  # the end of turn alone: nothing of the answer would be learned
        raise ValueError(f"empty response for prompt {prompt[:40]!r}: every label would be masked")
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer[:learned] + [IGNORE_INDEX] * (len(answer) - learned)
    return {"input_ids": full, "labels": labels}


def encode_chats(
    tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], max_length: int
) -> list[dict]:
    """Encode (prompt, response) pairs; refuse an example that would teach nothing or the wrong thing."""
    if not pairs:
        raise ValueError("no examples to encode: the training set is empty")
    prefix, end = response_prefix(tokenizer), end_of_turn_id(tokenizer)
    encoded = []
    for index, (prompt, response) in enumerate(pairs):
        if not response.strip():  # checked before the prefix, which is not an answer either
            raise ValueError(
                f"example {index} ({prompt[:40]!r}): empty response, every label would be masked"
            )
        full = encode_chat(tokenizer, prompt, prefix + response)
        item = {key: value[:max_length] for key, value in full.items()}  # keep the start
        if all(label == IGNORE_INDEX for label in item["labels"]):
            raise ValueError(
                f"example {index} ({prompt[:40]!r}): every label is masked, since the prompt fills "
                f"max_length={max_length}; nothing of its response would be learned"
            )
        if end not in item["labels"]:
            raise ValueError(
                f"example {index} ({prompt[:40]!r}): its response is cut at max_length={max_length} "
                "before the end of its turn, which would teach the model not to stop"
            )
        encoded.append(item)
    return encoded


def encode_instructions(
    tokenizer: PreTrainedTokenizerBase, examples: list, max_length: int = 128
) -> list[dict]:
    """``encode_chats`` for the instruction task's examples (anything with .prompt and .response)."""
    return encode_chats(tokenizer, [(ex.prompt, ex.response) for ex in examples], max_length)
