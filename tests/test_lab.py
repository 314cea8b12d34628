"""The lab's data, tasks and base model: what every technique page takes for granted."""

import pytest

from fieldguide.corpus import ANIMAL_HOMES, make_corpus
from fieldguide.data import IGNORE_INDEX, chat_prompt_ids, encode_prompt_response, pack_texts
from fieldguide.loading import ModelLoadError, load_model, tiny_model_dir
from fieldguide.metrics import exact_match, perplexity, preference_accuracy, sentiment_accuracy
from fieldguide.tasks import instruction_task, preference_task, sentiment_task


def test_corpus_is_deterministic_and_seed_dependent():
    assert make_corpus(50, seed=3) == make_corpus(50, seed=3)
    assert make_corpus(50, seed=3) != make_corpus(50, seed=4)


def test_corpus_rejects_an_empty_request():
    with pytest.raises(ValueError, match="at least 1"):
        make_corpus(0)


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


def test_prompt_is_masked_out_of_the_labels(micro_tokenizer):
    example = encode_prompt_response(micro_tokenizer, "repeat: fox owl", "fox owl")
    prompt_length = len(chat_prompt_ids(micro_tokenizer, "repeat: fox owl"))
    assert example["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert example["labels"][-1] == micro_tokenizer.eos_token_id


def test_an_empty_response_is_rejected_not_silently_skipped(micro_tokenizer):
    with pytest.raises(ValueError, match="every label would be masked"):
        encode_prompt_response(micro_tokenizer, "repeat: fox", "")


def test_packing_too_little_text_is_an_error(micro_tokenizer):
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts(micro_tokenizer, ["the fox"], block_size=512)


@pytest.mark.parametrize("task", [sentiment_task, instruction_task, preference_task])
def test_train_and_heldout_splits_share_no_example(task):
    split = task()
    assert split.train and split.heldout
    assert not set(split.train) & set(split.heldout)
    assert task() == split  # the same split every time


def test_sentiment_classes_are_balanced():
    labels = [ex.label for ex in sentiment_task().heldout]
    assert abs(sum(labels) / len(labels) - 0.5) < 0.1


def test_tiny_model_is_saved_as_safetensors_and_reloads(tiny):
    directory = tiny_model_dir()
    assert (directory / "model.safetensors").exists()
    assert not list(directory.glob("*.bin")) and not list(directory.glob("*.pt"))
    reloaded, _ = load_model(str(directory))
    model, _ = tiny
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert a.equal(b), name


def test_tiny_model_learned_the_corpus(tiny):
    model, tokenizer = tiny
    assert perplexity(model, tokenizer, make_corpus(100, seed=77)) < 3.0  # uniform guessing: ~460
    # Facts: after "the duck lives in the", the most likely token is the duck's home.
    from fieldguide.generate import top_next_tokens

    right = sum(
        top_next_tokens(model, tokenizer, f"the {a} lives in the", k=1)[0][0] == f" {h}"
        for a, h in ANIMAL_HOMES.items()
    )
    assert right >= 8


# The base model has never seen the tasks' formats, so it must start near chance: otherwise
# the gains the technique pages report would not be the techniques' doing.
def test_base_model_is_near_chance_on_sentiment(tiny):
    assert abs(sentiment_accuracy(*tiny, sentiment_task().heldout) - 0.5) <= 0.15


def test_base_model_is_near_chance_on_preferences(tiny):
    assert abs(preference_accuracy(*tiny, preference_task().heldout) - 0.5) <= 0.15


def test_base_model_cannot_follow_the_instructions(tiny):
    assert exact_match(*tiny, instruction_task().heldout) <= 0.05


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model", "no such directory"),
        ("./missing", "no such directory"),
        ("nobody/no-such-model", "cannot load model 'nobody/no-such-model'"),
    ],
)
def test_a_model_that_cannot_be_loaded_gives_a_clear_error(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name)
