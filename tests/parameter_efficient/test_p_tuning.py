"""Our P-tuning against PEFT's (PromptEncoderConfig), for both of its encoders: the same
prompt and logits from the same weights, the same encoder after the same training steps, the
parameter count of the formula, a prompt saved by us that PEFT loads, and the refusals."""

import copy

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file

from fieldguide.lab.loading import load_model
from fieldguide.lab.training import TrainConfig, causal_lm_loss, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient import p_tuning
from fieldguide.parameter_efficient.p_tuning import (
    PromptEncoder,
    add_p_tuning,
    main,
    p_tuning_parameters,
    save_p_tuning,
)
from fieldguide.parameter_efficient.prompt_tuning import INIT_TEXT, text_init
from lab_factories import adamw_steps, padded_batch, random_llama, random_qwen2

# (encoder type, virtual tokens, the encoder's hidden size; None is PEFT's default, the width)
CASES = [("MLP", 1, None), ("MLP", 5, 48), ("LSTM", 1, None), ("LSTM", 5, 24)]
IDS = [f"{kind}-{n}-tokens-hidden-{h}" for kind, n, h in CASES]


def pair(encoder_type: str, num_virtual_tokens: int, hidden: int | None, base=None, seed: int = 1):
    """PEFT's P-tuning and ours on copies of one base; ours takes PEFT's random start."""
    base = random_llama() if base is None else base
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        encoder_reparameterization_type=encoder_type,
        encoder_hidden_size=hidden,
    )
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base), config)
    ours = add_p_tuning(copy.deepcopy(base), num_virtual_tokens, hidden, encoder_type)
    # The same names, so PEFT's encoder's weights load into ours as they are.
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return theirs, ours


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("encoder_type", "n", "hidden"), CASES, ids=IDS)
@pytest.mark.parametrize("base", [random_llama, random_qwen2], ids=["llama", "qwen2"])
def test_same_encoder_gives_the_same_prompt_logits_and_loss(encoder_type, n, hidden, base):
    theirs, ours = pair(encoder_type, n, hidden, base())
    with torch.no_grad():
        torch.testing.assert_close(ours.get_prompt(2), theirs.get_prompt(2), atol=1e-6, rtol=0)
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        mine, library = ours(**batch, labels=labels), theirs(**batch, labels=labels)
    assert mine.logits.shape == (3, n + 10, 64)  # the prompt's positions included
    torch.testing.assert_close(mine.logits, library.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.loss, library.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("encoder_type", "n", "hidden"), CASES, ids=IDS)
def test_same_training_steps_give_the_same_encoder(encoder_type, n, hidden):
    theirs, ours = pair(encoder_type, n, hidden)
    start = {name: p.detach().clone() for name, p in ours.prompt_encoder.named_parameters()}
    ids = padded_batch()["input_ids"]
    adamw_steps(theirs, ids, lr=1e-3)
    adamw_steps(ours, ids, lr=1e-3)
    library = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, p in ours.prompt_encoder.named_parameters():
        assert not torch.equal(p, start[name]), f"{name} did not train"
        torch.testing.assert_close(p, library[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize(("encoder_type", "n", "hidden"), CASES, ids=IDS)
def test_trainable_parameters_match_peft_and_the_formula(encoder_type, n, hidden):
    theirs, ours = pair(encoder_type, n, hidden)
    d = ours.config.hidden_size
    counted = sum(p.numel() for p in trainable(ours).values())
    assert (
        counted
        == theirs.get_nb_trainable_parameters()[0]
        == p_tuning_parameters(n, d, hidden or d, encoder_type)
    )


def test_a_prompt_saved_by_us_loads_into_peft_without_its_encoder(tmp_path):
    _, ours = pair("MLP", 5, None, seed=2)
    save_p_tuning(ours, tmp_path / "prompt", None)
    assert load_file(tmp_path / "prompt" / "adapter_model.safetensors").keys() == {"prompt_embeddings"}
    theirs = PeftModel.from_pretrained(random_llama(), tmp_path / "prompt")
    assert not hasattr(theirs.prompt_encoder["default"], "mlp_head")  # loaded without the network
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)


def test_peft_saves_the_encoders_output_as_we_do(tmp_path):
    theirs, ours = pair("LSTM", 5, None, seed=3)
    theirs.save_pretrained(tmp_path / "theirs")
    save_p_tuning(ours, tmp_path / "ours", None)
    saved = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == mine.keys() == {"prompt_embeddings"}
    torch.testing.assert_close(saved["prompt_embeddings"], mine["prompt_embeddings"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_the_encoder_trains_and_no_base_weight_moves(encoder_type, checkpointing):
    model = add_p_tuning(random_llama(), 4, encoder_type=encoder_type)
    if checkpointing:
        enable_gradient_checkpointing(model)
        assert model.base_model.is_activation_checkpointing
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = padded_batch()["input_ids"].tolist()
    data = [{"input_ids": row, "labels": row} for row in ids] * 2
    train(model, data, TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name
    assert set(trainable(model)) == {
        f"prompt_encoder.{name}" for name, _ in model.prompt_encoder.named_parameters()
    }


@pytest.mark.parametrize(("encoder_type", "n", "hidden"), CASES, ids=IDS)
def test_the_labs_loss_gives_the_same_gradients(encoder_type, n, hidden):
    """The path the lab trains by: causal_lm_loss keeps the input's last T positions. Every
    weight's gradient, for both encoders (Adam's steps alone would hide a wrong scale)."""
    theirs, ours = pair(encoder_type, n, hidden)
    batch = padded_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for model in (ours, theirs):
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
    library = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, p in ours.prompt_encoder.named_parameters():
        # One virtual token gives an LSTM no earlier state, so its recurrent weights get none.
        assert p.grad.abs().sum() > 0 or (n == 1 and "weight_hh" in name), name
        torch.testing.assert_close(p.grad, library[name].grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("encoder_type", ["MLP", "LSTM"])
def test_the_text_start_makes_the_texts_embeddings_and_loads_into_peft(tiny, encoder_type):
    base, tokenizer = tiny
    ours = add_p_tuning(copy.deepcopy(base), 5, None, encoder_type, tokenizer, INIT_TEXT)
    target = text_init(base, tokenizer, INIT_TEXT, 5)
    with torch.no_grad():
        prompt = ours.get_prompt(1)[0]
    assert (prompt - target).abs().max() < 1e-3 * target.abs().max()
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_reparameterization_type=encoder_type
    )
    theirs = get_peft_model(copy.deepcopy(base), config)
    theirs.prompt_encoder["default"].load_state_dict(ours.prompt_encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(theirs.get_prompt(1)[0], prompt, atol=1e-6, rtol=0)


def test_a_text_start_that_does_not_fit_is_refused(tiny, monkeypatch):
    base, tokenizer = tiny
    monkeypatch.setattr(p_tuning, "fit_prompt_encoder", lambda encoder, target: 1.0)  # entries are near 0.3
    with pytest.raises(RuntimeError, match="did not fit"):
        add_p_tuning(copy.deepcopy(base), 5, tokenizer=tokenizer, init_text=INIT_TEXT)


def test_an_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="encoder_type must be one of"):
        PromptEncoder(4, 32, encoder_type="GRU")


def test_the_command_line_trains_and_saves_a_peft_adapter(tmp_path, capsys):
    output = tmp_path / "prompt"
    main(["--max-steps", "2", "--batch-size", "4", "--num-virtual-tokens", "3", "--encoder-type", "LSTM",
          "--output", str(output)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and f"saved to {output}" in printed
    assert load_file(output / "adapter_model.safetensors")["prompt_embeddings"].shape == (3, 128)
    base, _ = load_model("tiny")
    assert isinstance(PeftModel.from_pretrained(base, output), PeftModel)
    with pytest.raises(SystemExit):
        main(["--encoder-type", "GRU"])
    assert "--encoder-type" in capsys.readouterr().err
