"""Loading by name: a clear error for a model that cannot be loaded."""

import re

import pytest

from fieldguide.lab import pretrain
from fieldguide.lab.loading import ModelLoadError, load_model, save_model


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model", "no local folder named '/no/such/model', and '/no/such/model' is not a Hugging"),
        ("./missing", "no local folder named './missing'"),
        ("no-such-model", "'no-such-model' is not a Hugging Face Hub id (owner/name)"),
        (
            "nobody/no-such-model",
            "'nobody/no-such-model' was taken for a Hugging Face Hub id, but HF_HUB_OFFLINE",
        ),
    ],
)
def test_a_model_that_cannot_be_loaded_gives_a_clear_error(name, message):
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load_model(name)


def test_a_folder_that_is_not_a_model_names_the_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=re.escape(f"cannot load model '{tmp_path}'")):
        load_model(tmp_path)


def test_a_saved_model_loads_back_by_its_folder(micro_model, micro_tokenizer, tmp_path):
    save_model(micro_model, micro_tokenizer, tmp_path / "saved")
    assert {path.name for path in (tmp_path / "saved").iterdir()} >= {"model.safetensors", "config.json"}
    model, tokenizer = load_model(tmp_path / "saved")
    assert tokenizer.chat_template == micro_tokenizer.chat_template
    for name, weight in micro_model.state_dict().items():
        assert weight.equal(model.state_dict()[name]), name


def test_pretraining_the_tiny_model_says_so_on_stderr(
    micro_model, micro_tokenizer, tmp_path, monkeypatch, capsys
):
    """An empty cache: the first load pretrains (here a stand-in), and the reader is told why it waits."""
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "pretrain", lambda config: (micro_model, micro_tokenizer))
    load_model("tiny")
    err = capsys.readouterr().err
    assert f"Pretraining the lab's tiny model into {tmp_path / pretrain.tiny_model_dir().name}" in err
    load_model("tiny")  # cached now: silent
    assert "Pretraining" not in capsys.readouterr().err
