"""The comparison of every method: rows built from the runs as the page says (paired
differences from full fine-tuning, the bytes a user stores), every method's model prepared as
its page prepares it, and step times measured side by side."""

import pytest
import torch
from matplotlib.figure import Figure

from fieldguide.lab.experiment import make_run
from fieldguide.lab.stats import paired_score
from fieldguide.lab.training import TrainConfig
from fieldguide.parameter_efficient import dora, lora, p_tuning, prefix_tuning, prompt_tuning, qlora
from fieldguide.parameter_efficient.choosing_a_method import (
    FULL,
    METHODS,
    accuracy_figure,
    model_bytes,
    rows,
    safetensors_bytes,
    step_time_ratios,
    trainable_models,
)


def fake_run(after: list[int], adapter: dict | None = None):
    """A run whose held-out outcomes after training are ``after`` (all wrong before)."""
    run = make_run(torch.nn.Linear(2, 2), [0] * len(after), after, [0.7], 1.0, 10)
    run.adapter = adapter
    return run


FULL_OUTCOMES = [1, 0, 1, 0, 1, 1, 1, 0]
SMALL_OUTCOMES = [1, 1, 1, 0, 1, 1, 1, 0]
ADAPTER = {"layer.lora_A": torch.zeros(8, 32), "layer.lora_B": torch.zeros(32, 8)}
CONFIGS = {
    FULL: TrainConfig(max_steps=600, learning_rate=1e-3),
    "small": TrainConfig(max_steps=1500, learning_rate=3e-2),
}


def test_rows_compare_each_method_with_full_fine_tuning_review_by_review():
    runs = {FULL: fake_run(FULL_OUTCOMES), "small": fake_run(SMALL_OUTCOMES, ADAPTER)}
    full, small = rows(runs, CONFIGS, full_model_bytes=123_456)
    assert [full.method, small.method] == [FULL, "small"]
    assert small.heldout.value == pytest.approx(6 / 8)
    assert small.versus_full == paired_score(FULL_OUTCOMES, SMALL_OUTCOMES)
    assert small.versus_full.value == pytest.approx(1 / 8)
    assert full.versus_full.value == 0 and full.versus_full.low == full.versus_full.high == 0
    assert (small.steps, small.learning_rate) == (1500, 3e-2)


def test_a_row_stores_its_adapter_or_else_the_whole_model():
    runs = {FULL: fake_run(FULL_OUTCOMES), "small": fake_run(SMALL_OUTCOMES, ADAPTER)}
    full, small = rows(runs, CONFIGS, full_model_bytes=123_456)
    assert full.file_bytes == 123_456
    assert small.file_bytes == safetensors_bytes(ADAPTER)
    assert (full.stored_parameters, small.stored_parameters) == (full.trainable_parameters, 2 * 8 * 32)


def test_safetensors_bytes_is_the_file_a_user_keeps(tmp_path):
    size = safetensors_bytes(ADAPTER)
    numbers = 2 * 8 * 32
    assert 4 * numbers < size < 4 * numbers + 256  # float32 values and a short JSON header


def test_model_bytes_counts_every_weight_once(tiny):
    base, tokenizer = tiny
    # The tiny model ties its embedding and output matrices: saved once, not twice.
    stored = {id(p): p for p in base.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in stored)
    assert weights < model_bytes(base, tokenizer) < weights + 64 * 1024


@pytest.fixture(scope="module")
def models(tiny):
    return trainable_models(*tiny)


def test_every_method_is_prepared_as_its_page_prepares_it(tiny, models):
    base, _ = tiny
    assert list(models) == list(METHODS)
    trained = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    assert trained[FULL] == base.num_parameters()
    assert trained["LoRA"] == sum(t.numel() for t in lora.lora_state_dict(models["LoRA"]).values())
    assert all(0 < trained[name] < trained[FULL] / 10 for name in METHODS if name not in (FULL, "P-tuning"))
    # P-tuning trains a network of the model's width to make its prompt, then keeps the prompt.
    assert trained["P-tuning"] == p_tuning.p_tuning_parameters(
        20, base.config.hidden_size, base.config.hidden_size
    )
    # The layers that make each method what it is, where the counts alone cannot tell.
    assert any(isinstance(m, dora.DoraLinear) for m in models["DoRA"].modules())
    assert any(isinstance(m, qlora.Linear4bit) for m in models["QLoRA"].modules())
    assert not any(isinstance(m, qlora.Linear4bit) for m in models["LoRA"].modules())
    assert isinstance(models["prefix tuning"], prefix_tuning.PrefixTuningModel)
    assert isinstance(models["prompt tuning"], prompt_tuning.PromptTuningModel)
    assert isinstance(models["P-tuning"].prompt_encoder, p_tuning.PromptEncoder)


def test_preparing_leaves_the_base_as_it_was(tiny):
    base, tokenizer = tiny
    before = {name: (p.requires_grad, p.detach().clone()) for name, p in base.named_parameters()}
    trainable_models(base, tokenizer)
    after = dict(base.named_parameters())
    assert list(after) == list(before)
    for name, (requires_grad, value) in before.items():
        assert after[name].requires_grad == requires_grad and torch.equal(after[name], value), name


def test_step_times_are_relative_to_full_fine_tuning(tiny):
    ratios = step_time_ratios(*tiny)
    assert list(ratios) == list(METHODS)
    assert ratios[FULL] == 1.0
    assert all(0 < ratio < 10 for ratio in ratios.values()), ratios


def test_the_figure_draws_every_row_with_its_interval():
    runs = {FULL: fake_run(FULL_OUTCOMES), "small": fake_run(SMALL_OUTCOMES, ADAPTER)}
    table = rows(runs, CONFIGS, full_model_bytes=123_456)
    ax = Figure().subplots()  # no pyplot, so no backend to choose
    accuracy_figure(ax, table)
    # Best at the top: matplotlib counts rows from the bottom.
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert labels == [f"{FULL} (6)", "small (6)"]
    assert len(ax.containers) == 2  # one error bar each
    marks = {
        line.get_linestyle(): line.get_xdata()[0]
        for line in ax.get_lines()
        if line.get_linestyle() in ("--", ":")
    }
    assert marks == {"--": pytest.approx(5 / 8), ":": 0.5}  # full fine-tuning's score, chance


def test_every_method_names_the_settings_its_run_used():
    assert METHODS["LoRA"].config() is lora.PRESETS.tiny
    assert METHODS[FULL].config().max_steps == 600
    # BitFit's rate comes from its validation runs, which only its page should pay for.
    assert {METHODS[name].config().batch_size for name in METHODS if name != "BitFit"} == {16}
