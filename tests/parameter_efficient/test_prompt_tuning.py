"""Our prompt tuning against PEFT's (PromptTuningConfig): the same start from the same text,
the same outputs and loss from the same prompt, the same prompt after the same training steps,
a prompt saved by us that PEFT loads (and the reverse), and the refusals."""

import copy

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file

from fieldguide.lab.loading import load_model
from fieldguide.lab.pretrain import ensure_tiny_model
from fieldguide.lab.training import TrainConfig, causal_lm_loss, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.prompt_tuning import (
    add_prompt_tuning,
    main,
    prompt_tuning_state_dict,
    save_prompt,
)
from lab_factories import adamw_steps, padded_batch, random_llama, random_qwen2

NUM_VIRTUAL_TOKENS = [1, 5]


def pair(num_virtual_tokens: int, base=None, seed: int = 1):
    """PEFT's prompt tuning and ours on copies of one base, with the same random prompt."""
    base = random_llama() if base is None else base
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base), config)
    ours = add_prompt_tuning(copy.deepcopy(base), num_virtual_tokens)
    ours.prompt_encoder.embedding.weight.data.copy_(theirs.prompt_encoder["default"].embedding.weight)
    return theirs, ours


@pytest.mark.parametrize("num_virtual_tokens", NUM_VIRTUAL_TOKENS)
@pytest.mark.parametrize("base", [random_llama, random_qwen2], ids=["llama", "qwen2"])
def test_same_prompt_gives_the_same_logits_and_loss(num_virtual_tokens, base):
    theirs, ours = pair(num_virtual_tokens, base())
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        mine, library = ours(**batch, labels=labels), theirs(**batch, labels=labels)
    assert mine.logits.shape == (3, num_virtual_tokens + 10, 64)  # the prompt's positions included
    torch.testing.assert_close(mine.logits, library.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.loss, library.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_virtual_tokens", NUM_VIRTUAL_TOKENS)
def test_same_training_steps_give_the_same_prompt(num_virtual_tokens):
    theirs, ours = pair(num_virtual_tokens)
    start = ours.prompt_encoder.embedding.weight.detach().clone()
    ids = padded_batch()["input_ids"]
    adamw_steps(theirs, ids)
    adamw_steps(ours, ids)
    trained = ours.prompt_encoder.embedding.weight
    assert not torch.equal(trained, start)
    torch.testing.assert_close(trained, theirs.prompt_encoder["default"].embedding.weight, atol=1e-4, rtol=0)


def test_the_text_start_is_pefts():
    """PEFT's "TEXT" start reads the tiny model's tokenizer from disk; ours takes it loaded."""
    base, tokenizer = load_model("tiny")
    text = "decide if the review is good or bad."
    for n in (3, 25):  # the text's tokens cut short, and repeated
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=n,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(ensure_tiny_model()),
        )
        theirs = get_peft_model(copy.deepcopy(base), config)
        ours = add_prompt_tuning(copy.deepcopy(base), n, tokenizer, text)
        assert torch.equal(
            ours.prompt_encoder.embedding.weight, theirs.prompt_encoder["default"].embedding.weight
        )


def test_trainable_parameters_match_peft_and_the_formula():
    theirs, ours = pair(5)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert trainable == theirs.get_nb_trainable_parameters()[0] == 5 * ours.config.hidden_size


def test_a_prompt_saved_by_us_loads_into_peft_and_back(tmp_path):
    _, ours = pair(5, seed=2)
    save_prompt(ours, tmp_path / "prompt", None)
    theirs = PeftModel.from_pretrained(random_llama(), tmp_path / "prompt")
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)
    # And PEFT's own save loads back into ours through the same key.
    theirs.save_pretrained(tmp_path / "resaved")
    saved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert saved.keys() == prompt_tuning_state_dict(ours).keys() == {"prompt_embeddings"}
    assert torch.equal(saved["prompt_embeddings"], prompt_tuning_state_dict(ours)["prompt_embeddings"])


def test_a_bfloat16_base_keeps_a_float32_prompt():
    _, ours = pair(5, random_llama().to(torch.bfloat16))
    assert ours.prompt_encoder.embedding.weight.dtype == torch.float32
    ids = padded_batch()["input_ids"]
    ours(ids, labels=ids).loss.backward()
    grad = ours.prompt_encoder.embedding.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_the_prompt_trains_and_no_base_weight_moves(checkpointing):
    model = add_prompt_tuning(random_llama(), 4)
    if checkpointing:
        enable_gradient_checkpointing(model)
        assert model.base_model.is_activation_checkpointing
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = padded_batch()["input_ids"].tolist()
    data = [{"input_ids": row, "labels": row} for row in ids] * 2
    train(model, data, TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name


def test_the_prompt_is_made_on_the_bases_device():
    """The virtual tokens' indices live with the base's weights: on a GPU, indices left on the
    CPU would fail the first lookup. The meta device stands in for a GPU here."""
    with torch.device("meta"):
        base = random_llama()
    model = add_prompt_tuning(base, 4)
    assert model.prompt_tokens.device.type == model.prompt_encoder.embedding.weight.device.type == "meta"


def test_packed_rows_are_refused():
    model = add_prompt_tuning(random_llama(), 4)
    ids = padded_batch()["input_ids"]
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(10).expand(3, -1))


def test_the_command_line_trains_and_saves_a_peft_adapter(tmp_path, capsys):
    output = tmp_path / "prompt"
    main(["--max-steps", "2", "--batch-size", "4", "--num-virtual-tokens", "3", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and f"saved to {output}" in printed
    assert load_file(output / "adapter_model.safetensors")["prompt_embeddings"].shape == (3, 128)
    base, _ = load_model("tiny")
    assert isinstance(PeftModel.from_pretrained(base, output), PeftModel)
    with pytest.raises(SystemExit):
        main(["--num-virtual-tokens", "0"])
    assert "--num-virtual-tokens" in capsys.readouterr().err


def test_the_labs_loss_gives_the_same_loss_and_gradient():
    """The path the lab trains by: causal_lm_loss keeps the input's last T positions."""
    theirs, ours = pair(5)
    batch = padded_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    gradients = []
    for model, prompt in [(ours, ours.prompt_encoder), (theirs, theirs.prompt_encoder["default"])]:
        loss, targets = causal_lm_loss(model, batch)
        loss.backward()
        gradients.append((loss.detach(), targets, prompt.embedding.weight.grad))
    (mine, my_targets, my_grad), (library, their_targets, their_grad) = gradients
    assert my_targets == their_targets == int(batch["attention_mask"][:, 1:].sum())
    torch.testing.assert_close(mine, library, atol=1e-5, rtol=0)
    torch.testing.assert_close(my_grad, their_grad, atol=1e-6, rtol=0)
    assert my_grad.abs().sum() > 0
