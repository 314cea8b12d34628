"""The `fieldguide` command: it lists every example, runs each one, and what a fine-tune saves
with --output is a model that `fieldguide generate --chat` answers with."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fieldguide import __main__ as fieldguide
from fieldguide.__main__ import COMMANDS
from fieldguide.lab.cli import ExampleParser, help_with_default
from fieldguide.lab.tasks import instruction_task

CONSOLE = Path(sys.executable).parent / "fieldguide"  # the script pip installs with the package


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def assert_lists_every_example(text: str) -> None:
    for name, (_, summary) in COMMANDS.items():
        assert any(line.split() == [name, *summary.split()] for line in text.splitlines()), name


def test_no_arguments_list_every_example_with_its_line(capsys):
    fieldguide.main([])
    assert_lists_every_example(capsys.readouterr().out)


@pytest.mark.parametrize(
    "command",
    [[str(CONSOLE)], [sys.executable, "-m", "fieldguide"]],
    ids=["console script", "python -m fieldguide"],
)
def test_the_installed_command_lists_every_example(command):
    result = run(*command)
    assert result.returncode == 0, result.stderr
    assert_lists_every_example(result.stdout)


def test_an_unknown_example_is_one_line_naming_it():
    result = run(sys.executable, "-m", "fieldguide", "no-such-example")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no example named 'no-such-example'" in result.stderr


@pytest.fixture
def parsers(monkeypatch):
    """Every ExampleParser that prints its help, kept for the test to read."""
    shown = []
    print_help = ExampleParser.print_help

    def keep(self, file=None):
        shown.append(self)
        print_help(self, file)

    monkeypatch.setattr(ExampleParser, "print_help", keep)
    return shown


@pytest.mark.parametrize("name", COMMANDS)
def test_every_example_helps_with_every_default(name, parsers, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fieldguide"])  # restored afterwards: main sets argv[0]
    with pytest.raises(SystemExit) as exit_info:
        fieldguide.main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: fieldguide {name} [-h]")  # a command a reader can copy
    assert "(default: None)" not in text
    (parser,) = parsers
    for action in parser._actions:
        if action.option_strings and action.default is not argparse.SUPPRESS and not action.required:
            assert "default" in help_with_default(action), f"{name} {action.option_strings[0]}"


def test_the_console_script_runs_an_example():
    result = run(str(CONSOLE), "tutorial", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fieldguide tutorial [-h]")
    assert "--output DIR" in result.stdout


# -- End to end: fine-tune, save, chat ------------------------------------------------------------


@torch.no_grad()
def greedy_chat_answer(directory: Path, prompt: str, max_new_tokens: int) -> str:
    """The saved model's own greedy answer, with nothing of the lab: transformers alone.

    The lab's chat template ends a turn with EOS, so the model's EOS is where the answer stops.
    """
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_a_saved_fine_tune_answers_a_held_out_instruction(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fieldguide"])
    output = tmp_path / "my-first-fine-tune"
    # 40 steps of 8 chats: enough for the tiny model to answer rather than stop at once.
    fieldguide.main(
        ["tutorial", "--max-steps", "40", "--batch-size", "8", "--num-heldout", "1", "--output", str(output)]
    )
    assert f"saved to {output}" in capsys.readouterr().out
    assert (output / "model.safetensors").is_file()

    prompt = instruction_task().heldout[0].prompt
    fieldguide.main(
        ["generate", "--model", str(output), "--chat", "--prompt", prompt, "--max-new-tokens", "48"]
    )
    printed = capsys.readouterr().out
    expected = greedy_chat_answer(output, prompt, max_new_tokens=48)
    assert expected, "the fine-tune gave an empty answer: nothing would be compared"
    assert printed == expected + "\n"
