"""Runs kept on disk: computed once per version of the code, read back number for number."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification

import fieldguide
from fieldguide.lab import cache
from fieldguide.lab.cache import cached, code_hash
from fieldguide.lab.experiment import make_run, run_technique
from fieldguide.lab.training import TrainConfig
from lab_factories import CONFIG, language_modelling


def test_a_cached_run_is_computed_once_and_read_back(micro_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    calls = []

    @cached
    def tiny_run(steps: int = 3):
        from fieldguide.lab.pretrain import build_model
        from lab_factories import micro_config

        calls.append(steps)
        model = build_model(micro_config(), micro_tokenizer)
        config = TrainConfig(max_steps=steps, batch_size=4, progress=False)
        return run_technique(
            language_modelling(micro_tokenizer), model, micro_tokenizer, config, keep_model=True
        )

    first = tiny_run()
    second = tiny_run(steps=3)  # the same arguments, spelt differently: the same run
    assert calls == [3]
    assert second == first  # every number, read back from disk
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    tiny_run(steps=4)
    assert calls == [3, 4]


def test_changing_any_source_file_changes_the_key(tmp_path):
    package = tmp_path / "fieldguide"
    shutil.copytree(Path(fieldguide.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_hash(package)
    assert code_hash(package) == before  # the same code, the same key
    chat = package / "lab" / "chat.py"
    chat.write_text(chat.read_text() + "\n# a comment is a change too\n")
    assert code_hash(package) != before


def test_another_tiny_model_changes_the_key(monkeypatch):
    before = code_hash()
    monkeypatch.setattr(cache, "tiny_model_dir", lambda: Path("tiny-llama-another-recipe"))
    assert code_hash() != before


def test_a_cached_dict_of_runs_keeps_its_order(micro_model, micro_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    one = run_technique(language_modelling(micro_tokenizer), micro_model, micro_tokenizer, CONFIG)

    @cached
    def several():
        return {"zeta": one, "alpha": one}

    assert list(several()) == ["zeta", "alpha"]
    assert list(several()) == ["zeta", "alpha"]  # read back from disk, in the same order


def test_a_kept_model_comes_back_as_its_own_class(micro_model, micro_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    classifier = LlamaForSequenceClassification(replace(micro_model.config, num_labels=2))

    @cached
    def with_a_classifier():
        run = make_run(classifier, [0, 1], [1, 1], [0.5], seconds=1.0, tokens=10)
        run.model, run.tokenizer = classifier, micro_tokenizer
        return run

    with_a_classifier()
    back = with_a_classifier()
    assert type(back.model) is LlamaForSequenceClassification
    assert torch.equal(back.model.score.weight, classifier.score.weight)


def test_a_kept_model_that_cannot_be_saved_is_refused(micro_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    linear = torch.nn.Linear(2, 2)

    @cached
    def with_a_plain_module():
        run = make_run(linear, [0], [1], [0.5], seconds=1.0, tokens=10)
        run.model, run.tokenizer = linear, micro_tokenizer
        return run

    with pytest.raises(TypeError, match="can keep a transformers model, not a Linear"):
        with_a_plain_module()


def test_a_kept_model_with_layers_of_its_own_is_refused(micro_model, micro_tokenizer, tmp_path, monkeypatch):
    """from_pretrained would rebuild the plain model and fill the unknown layers at random."""
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))

    class Wrapped(torch.nn.Module):  # a from-scratch adapter, in miniature
        def __init__(self, base_layer):
            super().__init__()
            self.base_layer, self.extra = base_layer, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.base_layer(x) + self.extra

    attention = micro_model.model.layers[0].self_attn
    attention.q_proj = Wrapped(attention.q_proj)

    @cached
    def with_an_adapter():
        run = make_run(micro_model, [0], [1], [0.5], seconds=1.0, tokens=10)
        run.model, run.tokenizer = micro_model, micro_tokenizer
        return run

    with pytest.raises(
        TypeError, match=r"must be the plain LlamaForCausalLM .* has model\.layers\.0\.self_attn"
    ):
        with_an_adapter()


def test_a_kept_adapter_comes_back_tensor_for_tensor(micro_model, tmp_path, monkeypatch):
    """A from-scratch adapter is kept as its own tensors, the part a cached model cannot hold."""
    monkeypatch.setenv("FIELD_GUIDE_CACHE", str(tmp_path))
    adapter = {"layers.0.lora_A.weight": torch.randn(2, 8), "layers.0.lora_B.weight": torch.zeros(8, 2)}

    @cached
    def with_an_adapter():
        run = make_run(micro_model, [0], [1], [0.5], seconds=1.0, tokens=10)
        run.adapter = adapter
        return run

    with_an_adapter()
    read_back = with_an_adapter().adapter  # the second call reads from disk
    assert read_back.keys() == adapter.keys()
    for name, tensor in adapter.items():
        assert torch.equal(read_back[name], tensor), name
