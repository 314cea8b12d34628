"""Every runnable example: --help documents each flag; a bad argument is one clear line."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from fieldguide.foundations import what_are_llms as pretrain
from fieldguide.lab import generate
from fieldguide.lab.cli import model_name_problem, program_name
from fieldguide.whole_model import evaluation as evaluate
from fieldguide.whole_model import full_fine_tuning

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
        (
            "argument --model: no local folder named '/no/such/dir', and '/no/such/dir' is not a "
            "Hugging Face Hub id (owner/name)"
        ),
    ),
    ("generate", ["--chat-template", "/no/such/file.jinja"], "argument --chat-template: no such file"),
    ("evaluate", ["--bogus"], "unrecognized arguments: --bogus"),
    ("pretrain", [], "the following arguments are required: --output"),
    (
        "pretrain",
        ["--output", "x", "--model", "nobody/no-such-model"],
        (
            "argument --model: 'nobody/no-such-model' was taken for a Hugging Face Hub id, but "
            "HF_HUB_OFFLINE is set and it is not in the local cache"
        ),
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


# -- What --model names --------------------------------------------------------------------------

NOT_A_MODEL = "is not a Hugging Face Hub id (owner/name)"
OFFLINE_MISS = "was taken for a Hugging Face Hub id, but HF_HUB_OFFLINE is set"


def hub_cache_with(root: Path, repo_id: str) -> Path:
    """A Hub cache holding ``repo_id``'s config.json, laid out as huggingface_hub writes one."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    return root


@pytest.mark.parametrize(
    ("name", "offline", "problem"),
    [
        ("tiny", True, None),
        ("{tmp}", True, None),  # an existing folder, even one named like nothing else
        ("owner/name", False, None),  # a Hub id, online: left to the Hub to answer
        ("cached/model", True, None),  # a Hub id, offline, in the local cache
        ("owner/name", True, OFFLINE_MISS),
        ("no-such-model", False, NOT_A_MODEL),
        ("./missing", False, NOT_A_MODEL),
        ("a/b/c", False, NOT_A_MODEL),  # a path with two slashes that does not exist
        ("~/no-such-folder", False, NOT_A_MODEL),
    ],
)
def test_a_model_name_is_a_folder_or_a_hub_id(name, offline, problem, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache_with(tmp_path / "hub", "cached/model")))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    found = model_name_problem(name.format(tmp=tmp_path))
    assert found is None if problem is None else problem in found


def test_offline_is_read_from_the_environment_at_the_time(monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported counts too."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert OFFLINE_MISS in model_name_problem("owner/not-cached-here")


@pytest.mark.parametrize("name", ["no-such-model", "owner/not-cached-here"])
def test_a_bad_model_name_fails_at_once(name, capsys):
    """No loading, no retries: the parser refuses it (once torch and transformers are imported)."""
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", name])
    seconds = time.perf_counter() - start
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --model: " in err and repr(name) in err
    assert seconds < 0.5, f"{seconds:.2f} s to refuse {name!r}"


# -- Usage lines a reader can copy ---------------------------------------------------------------


def test_run_as_a_module_the_usage_names_the_module(monkeypatch):
    monkeypatch.setattr(sys, "argv", [generate.__file__])
    assert program_name() == "python -m fieldguide.lab.generate"


def test_run_through_the_console_command_the_usage_names_it(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fieldguide evaluation"])
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: fieldguide evaluation [-h]")


def test_python_dash_m_prints_a_usage_that_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fieldguide.lab.generate", "--bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("python -m fieldguide.lab.generate: error: unrecognized arguments")


# -- --output --------------------------------------------------------------------------------------


def test_output_that_holds_something_is_refused_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.setattr(full_fine_tuning, "run_technique", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        full_fine_tuning.main(["--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"argument --output: {tmp_path} exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: (tmp / "a-file").write_text("mine") and tmp / "a-file", "is a file; name a new folder"),
        (
            lambda tmp: (tmp / "a-file").write_text("mine") and tmp / "a-file" / "below",
            "cannot make the folder",
        ),
    ],
    ids=["a file", "under a file"],
)
def test_output_that_cannot_be_a_folder_is_refused_before_training(
    tmp_path, capsys, monkeypatch, make, message
):
    monkeypatch.setattr(full_fine_tuning, "run_technique", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        full_fine_tuning.main(["--output", str(make(tmp_path))])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
