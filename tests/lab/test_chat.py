"""Chats as training data, for the lab's model and for the Llama 3, Qwen2 and Gemma families.

The family models are built offline at toy size (tests/model_families.py) with their real
chat formats, so the real-model path of every chat example is tested without a download:
the end-of-turn token found, the answer and its end of turn the only targets, the preset for
real models chosen, and one training step taken through the command line.
"""

from dataclasses import replace
from functools import partial

import pytest
import torch

from fieldguide.lab.chat import (
    chat_prompt_ids,
    encode_chat,
    encode_instructions,
    end_of_turn_id,
    require_chat_template,
    response_prefix,
    stop_token_ids,
)
from fieldguide.lab.cli import add_training_arguments, example_parser, main_guard, training_config
from fieldguide.lab.data import IGNORE_INDEX, pad_batch
from fieldguide.lab.loading import load_model
from fieldguide.lab.tasks import instruction_task
from fieldguide.lab.training import train
from fieldguide.start_here import tutorial
from model_families import FAMILIES, family_tokenizer, save_family_model


def labelled_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


# -- The lab's own tokenizer ----------------------------------------------------------------------


def test_the_lab_template_ends_a_turn_with_eos(micro_tokenizer):
    assert end_of_turn_id(micro_tokenizer) == micro_tokenizer.eos_token_id
    assert response_prefix(micro_tokenizer) == " "


def test_prompt_is_masked_out_of_the_labels(micro_tokenizer):
    example = encode_chat(micro_tokenizer, "repeat: fox owl", " fox owl")
    prompt_length = len(chat_prompt_ids(micro_tokenizer, "repeat: fox owl"))
    assert example["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert example["labels"][prompt_length:] == example["input_ids"][prompt_length:]
    assert labelled_text(micro_tokenizer, example) == " fox owl<|eos|>"


def test_an_empty_response_is_rejected_not_silently_skipped(micro_tokenizer):
    with pytest.raises(ValueError, match="every label would be masked"):
        encode_chat(micro_tokenizer, "repeat: fox", "")


def test_a_template_that_never_closes_the_turn_is_refused(micro_tokenizer):
    broken = micro_tokenizer.chat_template.replace(
        "{{ eos_token }}{% endgeneration %}", "{% endgeneration %}"
    )
    micro_tokenizer.chat_template, original = broken, micro_tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match="not with a special token"):
            end_of_turn_id(micro_tokenizer)
    finally:
        micro_tokenizer.chat_template = original


# -- Real families ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, family_tokenizer(request.param)


def test_the_end_of_turn_token_is_read_from_the_template(family):
    name, tokenizer = family
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == FAMILIES[name].end_of_turn
    assert end_of_turn_id(tokenizer) in stop_token_ids(tokenizer)
    assert response_prefix(tokenizer) == ""  # the lab's leading space is for the lab's tokenizer only


def test_gemma_stops_at_the_end_of_a_turn_not_at_eos():
    tokenizer = family_tokenizer("gemma")
    assert end_of_turn_id(tokenizer) != tokenizer.eos_token_id
    assert stop_token_ids(tokenizer) == sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id})


def test_only_the_answer_and_its_end_of_turn_are_targets(family):
    name, tokenizer = family
    example = encode_chat(tokenizer, "repeat: fox owl", "fox owl")
    assert labelled_text(tokenizer, example) == "fox owl" + FAMILIES[name].end_of_turn
    # Whatever the template writes after the end of the turn (a newline for Qwen and Gemma)
    # is input, never a target: generation stops before it.
    last_target = max(i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX)
    assert example["input_ids"][last_target] == end_of_turn_id(tokenizer)
    assert all(t == IGNORE_INDEX for t in example["labels"][last_target + 1 :])


def test_a_base_model_without_a_template_is_refused_with_the_way_out():
    tokenizer = family_tokenizer("qwen2", chat_template=False)
    with pytest.raises(ValueError, match="--chat-template FILE"):
        require_chat_template(tokenizer)


def test_a_template_file_is_installed(tmp_path):
    tokenizer = family_tokenizer("qwen2", chat_template=False)
    (tmp_path / "chat.jinja").write_text(FAMILIES["gemma"].template)
    require_chat_template(tokenizer, tmp_path / "chat.jinja")
    assert tokenizer.chat_template == FAMILIES["gemma"].template


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_family_model(name, root / name) for name in FAMILIES}


def test_a_real_model_gets_the_real_preset(saved_families):
    parser = example_parser("test")
    add_training_arguments(parser, tutorial.PRESETS)
    for device, bf16 in (("cpu", False), ("cuda", True)):
        args = parser.parse_args(["--model", str(saved_families["qwen2"]), "--device", device])
        assert training_config(args, tutorial.PRESETS) == replace(tutorial.PRESETS.real, bf16=bf16)
    tiny = training_config(parser.parse_args([]), tutorial.PRESETS)
    assert tiny == tutorial.PRESETS.tiny and tiny.learning_rate > 10 * tutorial.PRESETS.real.learning_rate


def test_a_flag_given_overrides_the_preset(saved_families):
    parser = example_parser("test")
    add_training_arguments(parser, tutorial.PRESETS)
    argv = ["--model", str(saved_families["gemma"]), "--learning-rate", "1e-5", "--no-gradient-checkpointing"]
    config = training_config(parser.parse_args(argv), tutorial.PRESETS)
    assert (config.learning_rate, config.gradient_checkpointing) == (1e-5, False)
    assert config.grad_accum_steps == tutorial.PRESETS.real.grad_accum_steps


def test_help_shows_both_presets(capsys):
    with pytest.raises(SystemExit):
        tutorial.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.002 / 2e-05)" in text  # the learning rate: tiny / real
    for flag in ("--learning-rate", "--batch-size", "--grad-accum-steps", "--max-steps", "--bf16"):
        assert flag in text
    assert "--gradient-checkpointing" in text


def test_one_step_on_each_family_with_the_real_preset(saved_families):
    for name, directory in saved_families.items():
        model, tokenizer = load_model(directory)
        data = encode_instructions(tokenizer, instruction_task().train[:8])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        # The real preset as it runs on a CPU: gradient checkpointing on, bf16 off.
        config = replace(tutorial.PRESETS.real, max_steps=1, batch_size=4, grad_accum_steps=2, warmup_steps=0)
        (loss,) = train(model, data, config, collate=partial(pad_batch, pad_token_id=tokenizer.pad_token_id))
        assert torch.isfinite(torch.tensor(loss)), name
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == len(before), f"{name}: weights that did not move: {set(before) - set(changed)}"


def test_the_tutorial_command_runs_on_a_real_family_and_saves_it(saved_families, tmp_path, capsys):
    output = tmp_path / "tuned"
    argv = ["--model", str(saved_families["gemma"]), "--max-steps", "1", "--batch-size", "2"]
    tutorial.main([*argv, "--grad-accum-steps", "1", "--num-heldout", "4", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "exact match after" in printed and f"saved to {output}" in printed
    reloaded, tokenizer = load_model(output)
    assert reloaded.config.model_type == "gemma"
    assert tokenizer.chat_template == FAMILIES["gemma"].template  # saved with the model


def test_the_tutorial_command_refuses_a_model_without_a_template(tmp_path, capsys):
    directory = save_family_model("llama3", tmp_path / "base", chat_template=False)
    with pytest.raises(SystemExit) as exit_info:  # main_guard: one line, no traceback
        main_guard(lambda: tutorial.main(["--model", str(directory), "--max-steps", "1"]))
    assert str(exit_info.value).startswith("error: the tokenizer of")
    assert "--chat-template FILE" in str(exit_info.value)


def test_a_special_token_the_tokenizer_does_not_name_is_still_found():
    """Llama 3's base tokenizer marks <|eot_id|> special without listing it among its special
    tokens; the instruct template given with --chat-template must still work on it."""
    tokenizer = family_tokenizer("llama3-base")
    assert "<|eot_id|>" not in tokenizer.all_special_tokens
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|eot_id|>"
