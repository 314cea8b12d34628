"""The tutorial's fine-tune: its masking agrees with transformers, it trains, it saves and reloads."""

import copy

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fieldguide.lab.chat import encode_instructions, response_prefix
from fieldguide.lab.cli import add_training_arguments, example_parser, training_config
from fieldguide.lab.data import IGNORE_INDEX
from fieldguide.lab.experiment import make_run, run_technique
from fieldguide.lab.loading import load_model
from fieldguide.lab.metrics import generate_responses
from fieldguide.lab.tasks import InstructionExample, instruction_task
from fieldguide.lab.training import TrainConfig
from fieldguide.start_here import tutorial

CASES = [
    InstructionExample("reverse: rice green nut", "nut green rice"),
    InstructionExample("repeat: fox owl pie", "fox owl pie"),
    InstructionExample("last word of: red cake duck", "duck"),
]


@pytest.mark.parametrize("example", CASES, ids=lambda ex: ex.prompt)
def test_the_loss_mask_is_the_chat_templates_assistant_mask(tiny, example):
    # transformers derives the same mask from the template's {% generation %} markers; TRL's
    # assistant-only loss uses it, so our labels train exactly the tokens TRL would.
    _, tokenizer = tiny
    messages = [
        {"role": "user", "content": example.prompt},
        {"role": "assistant", "content": response_prefix(tokenizer) + example.response},
    ]
    reference = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    (ours,) = encode_instructions(tokenizer, [example])
    assert ours["input_ids"] == reference["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in ours["labels"]] == reference["assistant_masks"]


def test_encoding_no_examples_is_an_error(tiny):
    with pytest.raises(ValueError, match="training set is empty"):
        encode_instructions(tiny[1], [])


@pytest.mark.parametrize("model", ["tiny", "{tmp}"])  # the tiny model's preset, then a real model's
def test_the_tutorial_presets_fit_the_task(model, tmp_path):
    parser = example_parser("test")
    add_training_arguments(parser, tutorial.PRESETS)
    argv = ["--model", model.format(tmp=tmp_path), "--seed", "3"]  # a folder passes for a real model
    config = training_config(parser.parse_args(argv), tutorial.PRESETS)
    assert config.seed == 3
    assert config.warmup_steps < config.max_steps
    assert config.batch_size <= len(instruction_task().train)


def test_fine_tuning_lowers_the_loss_and_trains_every_parameter(tiny):
    model = copy.deepcopy(tiny[0])  # never train the shared fixture
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(max_steps=12, batch_size=16, learning_rate=3e-3, warmup_steps=2, progress=False)
    technique = tutorial.instruction_following(CASES)
    run = run_technique(technique, model, tiny[1], config)
    assert len(run.losses) == 12
    assert run.losses[-1] < run.losses[0] / 2
    assert run.trainable_parameters == run.total_parameters == model.num_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not model.training  # handed back ready to evaluate
    assert run.before.n == run.after.n == len(CASES)  # scored on the held-out prompts given


def test_a_saved_model_reloads_with_identical_answers(micro_model, micro_tokenizer, tmp_path):
    micro_model.config.pad_token_id = micro_tokenizer.pad_token_id
    micro_model.save_pretrained(tmp_path)
    micro_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded, tokenizer = load_model(str(tmp_path))
    prompts = [ex.prompt for ex in CASES]
    assert generate_responses(reloaded, tokenizer, prompts, max_new_tokens=4) == generate_responses(
        micro_model.eval(), micro_tokenizer, prompts, max_new_tokens=4
    )


def fake_run(losses: list[float]):
    """A ``Run`` with the given losses, as ``run_technique`` would return it."""
    return make_run(torch.nn.Linear(2, 1), [0, 1, 0], [1, 1, 0], losses, seconds=0.1, tokens=30)


def test_loss_figure_draws_the_memoised_run(monkeypatch):
    run = fake_run([3.0, 2.0, 1.0])
    monkeypatch.setattr(tutorial, "run_tutorial_finetune", lambda seed=0: run)
    figure, ax = plt.subplots()
    tutorial.loss_figure(ax)
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == run.losses
    assert ax.get_legend() is not None and ax.get_xlabel() and ax.get_title()
    plt.close(figure)


def test_the_run_is_memoised(monkeypatch, tmp_path):
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))  # a cache of its own, empty
    calls = []

    def counting_run_technique(technique, model, tokenizer, config, keep_model=False):
        calls.append(config)
        return fake_run([3.0, 2.0, 1.0])

    monkeypatch.setattr(tutorial, "load_model", lambda name: (None, None))
    monkeypatch.setattr(tutorial, "run_technique", counting_run_technique)
    first = tutorial.run_tutorial_finetune()
    second = tutorial.run_tutorial_finetune()
    assert calls == [tutorial.PRESETS.tiny]  # trained once, with the page's preset
    assert second.losses == first.losses == [3.0, 2.0, 1.0]
    assert second.after == first.after


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-steps", "0"], "argument --max-steps: must be 1 or more"),
        (["--learning-rate", "-1"], "argument --learning-rate: must be above 0"),
        (["--model", "./no-such-dir"], "argument --model: no local folder named './no-such-dir'"),
    ],
)
def test_bad_arguments_get_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tutorial.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_command_line_fine_tunes_and_saves(micro_model, micro_tokenizer, tmp_path, capsys):
    source, output = tmp_path / "base", tmp_path / "tuned"
    micro_model.save_pretrained(source)
    micro_tokenizer.save_pretrained(source)
    tutorial.main(
        ["--model", str(source), "--max-steps", "2", "--num-heldout", "10", "--output", str(output)]
    )
    printed = capsys.readouterr().out
    assert "exact match before" in printed and "exact match after" in printed
    assert (output / "model.safetensors").exists() and (output / "tokenizer.json").exists()
