"""Instruction tuning: parity of our masked loss with TRL's SFTTrainer, packing, clear errors."""

import copy
import dataclasses

import pytest
import torch

from fieldguide import sft
from fieldguide.data import IGNORE_INDEX, pad_batch
from fieldguide.sft import (
    SFTConfig,
    check_chat_template,
    collate_packed,
    encode_chat_examples,
    pack_examples,
    packed_lm_loss,
    trl_trainer,
)
from fieldguide.tasks import InstructionExample, instruction_task
from fieldguide.training import causal_lm_loss


@pytest.fixture(scope="module")
def examples():
    return instruction_task().train[:12]


# TRL tokenizes the chat itself; our loss then scores TRL's batch and our own batch.
PARITY_CASES = [
    # (batch size, response prefix)
    (1, " "),
    (5, " "),
    (12, " "),
    (8, ""),  # the raw responses, first word without its space
]


@pytest.mark.parametrize(("batch_size", "prefix"), PARITY_CASES)
def test_our_masked_loss_equals_trl_sft_loss(tiny, examples, tmp_path, batch_size, prefix):
    model, tokenizer = tiny
    config = SFTConfig(batch_size=batch_size, response_prefix=prefix)
    trainer = trl_trainer(copy.deepcopy(model), copy.deepcopy(tokenizer), examples, config, str(tmp_path))
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(batch_size)])
    ours = pad_batch(encode_chat_examples(tokenizer, examples[:batch_size], config), tokenizer.pad_token_id)
    for key in ours:  # the same tokens, the same masked labels
        assert torch.equal(ours[key], trl_batch[key]), key
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch))
        loss_sum, count = causal_lm_loss(model, ours)
    assert abs(trl_loss.item() - (loss_sum / count).item()) < 1e-5


def test_packed_rows_give_each_example_its_standalone_logits(tiny, examples):
    model, tokenizer = tiny
    data = encode_chat_examples(tokenizer, examples[:3], SFTConfig())
    batch = collate_packed(pack_examples(data, max_length=128), tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        start = 0
        for ex in sorted(data, key=lambda ex: len(ex["input_ids"]), reverse=True):  # packing order
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert torch.allclose(packed[0, start : start + len(alone)], alone, atol=1e-4)
            start += len(alone)


def test_packed_loss_equals_padded_loss(tiny, examples):
    model, tokenizer = tiny
    data = encode_chat_examples(tokenizer, examples, SFTConfig())
    padded_sum, padded_count = causal_lm_loss(model, pad_batch(data, tokenizer.pad_token_id))
    packed = collate_packed(pack_examples(data, max_length=128), tokenizer.pad_token_id)
    packed_sum, packed_count = packed_lm_loss(model, packed)
    assert packed_count == padded_count
    assert torch.allclose(packed_sum, padded_sum, rtol=1e-5)


def test_packing_keeps_every_token_and_respects_max_length(tiny, examples):
    _, tokenizer = tiny
    data = encode_chat_examples(tokenizer, examples, SFTConfig())
    rows = pack_examples(data, max_length=45)
    assert all(len(row["input_ids"]) <= 45 for row in rows)
    assert sum(len(row["input_ids"]) for row in rows) == sum(len(ex["input_ids"]) for ex in data)


def test_instruction_tune_with_packing_lowers_the_loss(tiny, examples):
    model, tokenizer = tiny
    config = SFTConfig(max_steps=4, batch_size=2, packing=True)
    losses = sft.instruction_tune(copy.deepcopy(model), tokenizer, examples, config)
    assert len(losses) == 4 and losses[-1] < losses[0]


BAD_DATA = [
    # (example, max_length, message)
    (InstructionExample("repeat: fox owl cat", "fox owl cat"), 8, "every label is masked"),
    (InstructionExample("repeat: fox owl cat", "fox owl cat"), 15, "cut at max_length=15 before EOS"),
    (InstructionExample("repeat: fox owl cat", ""), 128, "empty response"),
]


@pytest.mark.parametrize(("example", "max_length", "message"), BAD_DATA)
def test_examples_that_teach_nothing_are_refused(tiny, example, max_length, message):
    _, tokenizer = tiny
    config = SFTConfig(max_length=max_length, response_prefix="")
    with pytest.raises(ValueError, match=message):
        encode_chat_examples(tokenizer, [example], config)


def test_a_chat_template_without_eos_is_refused(tiny):
    _, tokenizer = tiny
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = broken.chat_template.replace(
        "{{ eos_token }}{% endgeneration %}", "{% endgeneration %}"
    )
    check_chat_template(tokenizer)  # the lab's template passes
    with pytest.raises(ValueError, match="never emits EOS"):
        check_chat_template(broken)


def test_labels_cover_the_response_and_its_eos_only(tiny, examples):
    _, tokenizer = tiny
    (item,) = encode_chat_examples(tokenizer, examples[:1], SFTConfig())
    targets = [label for label in item["labels"] if label != IGNORE_INDEX]
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(targets[:-1]) == " " + examples[0].response


BAD_ARGUMENTS = [
    (["--steps", "0"], "argument --steps: must be 1 or more, got 0"),
    (["--batch-size", "x"], "argument --batch-size: invalid positive_int value: 'x'"),
    (["--learning-rate", "-1"], "argument --learning-rate: must be 0 or more, got -1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS)
def test_cli_bad_argument_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_config_is_hashable_and_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SFTConfig().max_steps = 1
