"""Instruction tuning: parity of our masked loss with TRL's SFTTrainer, packing, clear errors."""

import copy
import dataclasses

import pytest
import torch

from fieldguide.lab.chat import encode_instructions, end_of_turn_id, response_prefix
from fieldguide.lab.data import IGNORE_INDEX, pad_batch
from fieldguide.lab.experiment import run_technique
from fieldguide.lab.loading import load_model
from fieldguide.lab.tasks import InstructionExample, instruction_task
from fieldguide.lab.tokenizer import CHAT_TEMPLATE
from fieldguide.lab.training import TrainConfig, causal_lm_loss
from fieldguide.whole_model import instruction_tuning
from fieldguide.whole_model.instruction_tuning import collate_packed, pack_examples, trl_trainer


@pytest.fixture(scope="module")
def examples():
    return instruction_task().train[:12]


def with_response_prefix(tokenizer, prefix: str):
    """``tokenizer`` itself for a space before every answer; for none, a copy whose template
    renders the same chats but is not the lab's, as a real model's (so no space is added)."""
    if prefix == response_prefix(tokenizer):
        return tokenizer
    other = copy.deepcopy(tokenizer)
    other.chat_template = CHAT_TEMPLATE + "{# another family's template #}"
    assert response_prefix(other) == prefix
    return other


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
    model, tokenizer = tiny[0], with_response_prefix(tiny[1], prefix)
    config = TrainConfig(batch_size=batch_size)
    trainer = trl_trainer(copy.deepcopy(model), copy.deepcopy(tokenizer), examples, config, str(tmp_path))
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(batch_size)])
    ours = pad_batch(encode_instructions(tokenizer, examples[:batch_size]), tokenizer.pad_token_id)
    for key in ours:  # the same tokens, the same masked labels
        assert torch.equal(ours[key], trl_batch[key]), key
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(trl_batch))
        loss_sum, count = causal_lm_loss(model, ours)
    assert abs(trl_loss.item() - (loss_sum / count).item()) < 1e-5


def test_packed_rows_give_each_example_its_standalone_logits(tiny, examples):
    model, tokenizer = tiny
    data = encode_instructions(tokenizer, examples[:3])
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
    data = encode_instructions(tokenizer, examples)
    padded_sum, padded_count = causal_lm_loss(model, pad_batch(data, tokenizer.pad_token_id))
    packed = collate_packed(pack_examples(data, max_length=128), tokenizer.pad_token_id)
    assert "position_ids" in packed and "attention_mask" not in packed
    packed_sum, packed_count = causal_lm_loss(model, packed)  # the lab's loss passes position ids on
    assert packed_count == padded_count
    assert torch.allclose(packed_sum, padded_sum, rtol=1e-5)


def test_packing_keeps_every_token_and_respects_max_length(tiny, examples):
    _, tokenizer = tiny
    data = encode_instructions(tokenizer, examples)
    rows = pack_examples(data, max_length=45)
    assert all(len(row["input_ids"]) <= 45 for row in rows)
    assert sum(len(row["input_ids"]) for row in rows) == sum(len(ex["input_ids"]) for ex in data)


def test_instruction_tuning_with_packing_lowers_the_loss(tiny):
    model, tokenizer = tiny
    heldout = instruction_task().heldout[:4]
    technique = instruction_tuning.instruction_tuning(heldout, tokenizer.pad_token_id, packing=True)
    rows = technique.data(tokenizer)  # the rows it trains on are packed ones
    assert len(rows) < len(instruction_task().train) and all("position_ids" in row for row in rows)
    assert "position_ids" in technique.collate(rows[:2])
    config = TrainConfig(max_steps=4, batch_size=2, learning_rate=3e-3, progress=False)
    run = run_technique(technique, copy.deepcopy(model), tokenizer, config)
    assert len(run.losses) == 4 and run.losses[-1] < run.losses[0]


BAD_DATA = [
    # (example, max_length, message)
    (InstructionExample("repeat: fox owl cat", "fox owl cat"), 8, "every label is masked"),
    (InstructionExample("repeat: fox owl cat", "fox owl cat"), 15, "cut at max_length=15 before the end"),
    (InstructionExample("repeat: fox owl cat", ""), 128, "empty response"),
]


@pytest.mark.parametrize(("example", "max_length", "message"), BAD_DATA)
def test_examples_that_teach_nothing_are_refused(tiny, example, max_length, message):
    tokenizer = with_response_prefix(tiny[1], "")
    with pytest.raises(ValueError, match=message):
        encode_instructions(tokenizer, [example], max_length)


def test_a_chat_template_without_an_end_of_turn_token_is_refused(tiny, examples):
    _, tokenizer = tiny
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = broken.chat_template.replace(
        "{{ eos_token }}{% endgeneration %}", "{% endgeneration %}"
    )
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id  # the lab's template passes
    with pytest.raises(ValueError, match="not with a special token"):
        end_of_turn_id(broken)
    with pytest.raises(ValueError, match="not with a special token"):
        encode_instructions(broken, examples[:1])


CLOSING = "{{ eos_token }}{% endgeneration %}"  # the lab's template: EOS inside the span
BAD_TEMPLATES = [
    # (what replaces CLOSING, error message); with no {% endgeneration %} left, {% generation %} goes too
    ("{% endgeneration %}{{ eos_token }}", "outside its {% generation %} span"),  # EOS after the span
    ("{{ eos_token }}", "marks no assistant tokens"),  # no span at all
]


def test_the_lab_template_trains_the_token_that_closes_a_turn(micro_tokenizer):
    instruction_tuning.check_chat_template(micro_tokenizer)  # passes: nothing raised


@pytest.mark.parametrize(("closing", "message"), BAD_TEMPLATES)
def test_a_template_leaving_the_turn_end_untrained_is_refused(micro_tokenizer, closing, message, tmp_path):
    broken = copy.deepcopy(micro_tokenizer)
    template = CHAT_TEMPLATE.replace(CLOSING, closing)
    if "endgeneration" not in closing:
        template = template.replace("{% generation %}", "")
    broken.chat_template = template
    assert end_of_turn_id(broken) == broken.eos_token_id  # the rendered text still closes the turn
    with pytest.raises(ValueError, match=message):
        instruction_tuning.check_chat_template(broken)
    with pytest.raises(ValueError, match=message):  # TRL's trainer is never built on such a template
        trl_trainer(None, broken, instruction_task().train[:1], TrainConfig(), str(tmp_path))


def test_labels_cover_the_response_and_its_eos_only(tiny, examples):
    _, tokenizer = tiny
    (item,) = encode_instructions(tokenizer, examples[:1])
    targets = [label for label in item["labels"] if label != IGNORE_INDEX]
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(targets[:-1]) == " " + examples[0].response


BAD_ARGUMENTS = [
    (["--max-steps", "0"], "argument --max-steps: must be 1 or more, got 0"),
    (["--batch-size", "x"], "argument --batch-size: invalid positive_int value: 'x'"),
    (["--learning-rate", "-1"], "argument --learning-rate: must be above 0, got -1"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS)
def test_cli_bad_argument_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        instruction_tuning.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_presets_are_hashable_and_frozen():
    presets = instruction_tuning.PRESETS
    assert hash(presets) == hash(dataclasses.replace(presets))  # equal settings, one cache key
    with pytest.raises(dataclasses.FrozenInstanceError):
        presets.tiny.max_steps = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        presets.tiny = presets.real


def test_the_command_line_saves_the_instruction_tuned_model(tiny, tmp_path, capsys):
    instruction_tuning.main(["--max-steps", "1", "--batch-size", "4", "--output", str(tmp_path / "sft")])
    assert f"saved to {tmp_path / 'sft'}" in capsys.readouterr().out
    saved, tokenizer = load_model(tmp_path / "sft")
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the template it was trained with
    assert any(not w.equal(tiny[0].state_dict()[k]) for k, w in saved.state_dict().items())
