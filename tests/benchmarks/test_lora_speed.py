"""The LoRA speed benchmark, run on a model small enough for the tests, so that it cannot rot."""

import pytest

from fieldguide.benchmarks import lora_speed
from fieldguide.parameter_efficient.lora import lora_layers
from lab_factories import RANDOM_SHAPE

SMALL = {**RANDOM_SHAPE, "vocab_size": 64, "tie_word_embeddings": False}


def test_the_benchmark_shape_has_the_size_it_claims():
    model = lora_speed.benchmark_model()
    assert sum(p.numel() for p in model.parameters()) == 33_694_208


def test_the_contenders_train_what_each_method_trains():
    models = lora_speed.contenders(lora_speed.benchmark_model(SMALL), r=2)
    trained = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    assert trained["full fine-tuning"] == sum(p.numel() for p in models["full fine-tuning"].parameters())
    assert trained["PEFT's LoRA"] == trained["our LoRA"]  # the same layers adapted, at the same rank
    ours = models["our LoRA"]
    assert trained["our LoRA"] == sum(
        2 * (m.base_layer.in_features + m.base_layer.out_features) for m in lora_layers(ours)
    )


def test_the_profile_names_the_matrix_multiplications():
    model = lora_speed.contenders(lora_speed.benchmark_model(SMALL), r=2)["our LoRA"]
    batch = lora_speed.benchmark_batch(64, batch_size=2, length=8)
    assert "aten::mm" in lora_speed.profile_step(model, batch)


def test_a_bad_argument_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_speed.main(["--rounds", "0"])
    assert exit_info.value.code == 2
    assert "argument --rounds: " in capsys.readouterr().err


def test_each_phase_of_a_step_is_timed_for_every_contender():
    models = lora_speed.contenders(lora_speed.benchmark_model(SMALL), r=2)
    batch = lora_speed.benchmark_batch(64, batch_size=2, length=8)
    phases = lora_speed.phase_seconds(models, batch, rounds=1)
    assert list(phases) == list(models)
    for timings in phases.values():
        assert list(timings) == ["forward", "backward", "optimizer"]
        assert all(value > 0 for value in timings.values())
