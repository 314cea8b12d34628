"""The lab's tokenizer: special tokens, BOS first, and a chat template with generation markers."""


def test_tokenizer_has_the_special_tokens_and_puts_bos_first(micro_tokenizer):
    ids = micro_tokenizer("the fox")["input_ids"]
    assert ids[0] == micro_tokenizer.bos_token_id
    assert (
        len({micro_tokenizer.bos_token_id, micro_tokenizer.eos_token_id, micro_tokenizer.pad_token_id}) == 3
    )
    assert micro_tokenizer.decode(ids, skip_special_tokens=True) == "the fox"


def test_chat_template_marks_exactly_the_assistant_tokens(micro_tokenizer):
    messages = [{"role": "user", "content": "repeat: fox owl"}, {"role": "assistant", "content": "fox owl"}]
    encoded = micro_tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    answer = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    assert micro_tokenizer.decode(answer) == "fox owl<|eos|>"
