"""Every runnable example: --help documents each flag; a bad argument is one clear line."""

import pytest

from fieldguide.foundations import what_are_llms as pretrain
from fieldguide.lab import generate
from fieldguide.whole_model import evaluation as evaluate

EXAMPLES = {"generate": generate.main, "evaluate": evaluate.main, "pretrain": pretrain.main}


@pytest.mark.parametrize("name", EXAMPLES)
def test_help_documents_the_shared_flags(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        EXAMPLES[name](["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--device", "--seed"):
        assert flag in text


BAD_ARGUMENTS = [
    ("generate", ["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    ("generate", ["--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
    ("generate", ["--seed", "one"], "argument --seed: invalid non_negative_int value: 'one'"),
    ("generate", ["--max-new-tokens", "0"], "argument --max-new-tokens: must be 1 or more, got 0"),
    ("generate", ["--temperature", "nan"], "argument --temperature: must be 0 or more, got nan"),
    ("generate", ["--prompt", "  "], "argument --prompt: must not be empty"),
    (
        "generate",
        ["--model", "/no/such/dir"],
        "argument --model: cannot load model '/no/such/dir': no such directory",
    ),
    ("evaluate", ["--bogus"], "unrecognized arguments: --bogus"),
    ("pretrain", [], "the following arguments are required: --output"),
    (
        "pretrain",
        ["--output", "x", "--model", "nobody/no-such-model"],
        "argument --model: cannot load model 'nobody/no-such-model'",
    ),
    ("pretrain", ["--output", "x", "--max-steps", "0"], "argument --max-steps: must be 1 or more, got 0"),
]


@pytest.mark.parametrize(("name", "argv", "message"), BAD_ARGUMENTS)
def test_a_bad_argument_exits_2_with_one_line_naming_it(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        EXAMPLES[name](argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage block, no traceback
    assert message in err


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "argument --device: cuda was asked for, but PyTorch sees no CUDA GPU" in capsys.readouterr().err


def test_pretrain_refuses_to_overwrite_a_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        pretrain.main(["--output", str(tmp_path)])
    assert "exists and is not empty" in capsys.readouterr().err


def test_pretrain_saves_a_model_that_generate_loads(tmp_path, capsys):
    pretrain.main(["--output", str(tmp_path / "m"), "--max-steps", "3", "--no-progress"])
    assert "saved to" in capsys.readouterr().out
    generate.main(["--model", str(tmp_path / "m"), "--max-new-tokens", "3", "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].startswith("the duck lives in the")


def test_pretrain_takes_another_architecture_from_its_configuration(tmp_path, capsys):
    """--model names a shape to pretrain from scratch: here a two-layer GPT-2."""
    from transformers import AutoModelForCausalLM, GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128).save_pretrained(tmp_path / "shape")
    pretrain.main(["--output", str(tmp_path / "m"), "--model", str(tmp_path / "shape"), "--max-steps", "2"])
    assert "saved to" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "gpt2" and model.config.n_layer == 2
