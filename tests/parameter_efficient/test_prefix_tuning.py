"""Our prefix tuning against PEFT's (PrefixTuningConfig): the same outputs and loss from the
same prefix, with and without the reparametrizing network, the same gradients and the same
prefix after the same training steps, a prefix saved by us that PEFT loads (and PEFT's own save
in the same layout), the start from text, and the refusals (gradient checkpointing, packed rows)."""

import copy

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model, initialize_kv_prefix_from_text
from safetensors.torch import load_file

from fieldguide.lab.loading import load_model
from fieldguide.lab.training import TrainConfig, causal_lm_loss, enable_gradient_checkpointing, train
from fieldguide.parameter_efficient.prefix_tuning import (
    add_prefix_tuning,
    key_value_shape,
    main,
    prefix_tuning_state_dict,
    save_prefix,
)
from fieldguide.parameter_efficient.prompt_tuning import INIT_TEXT
from lab_factories import adamw_steps, padded_batch, random_llama, random_qwen2

# PEFT 0.21 hands the prefix to transformers under the old name, which 5.24 deprecates: PEFT's
# to change, not ours (ours uses the name the installed transformers takes).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

# (virtual tokens, width of the reparametrizing network or None): the table of cases.
CASES = [(1, None), (5, None), (5, 24)]
CASE_IDS = ["1-token", "5-tokens", "5-tokens-projected"]


def pair(num_virtual_tokens: int, encoder_hidden_size: int | None = None, base=None, seed: int = 1):
    """PEFT's prefix tuning and ours on copies of one base, with the same random prefix (or network)."""
    base = random_llama() if base is None else base
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=encoder_hidden_size is not None,
        encoder_hidden_size=encoder_hidden_size,
    )
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base), config)
    ours = add_prefix_tuning(copy.deepcopy(base), num_virtual_tokens, encoder_hidden_size=encoder_hidden_size)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return theirs, ours


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("num_virtual_tokens", "encoder_hidden_size"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("base", [random_llama, random_qwen2], ids=["llama", "qwen2"])
def test_same_prefix_gives_the_same_logits_and_loss(num_virtual_tokens, encoder_hidden_size, base):
    theirs, ours = pair(num_virtual_tokens, encoder_hidden_size, base())
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    mine, library = ours(**batch, labels=labels), theirs(**batch, labels=labels)
    with torch.no_grad():
        plain = base()(**batch).logits
    assert mine.logits.shape == (3, 10, 64)  # the input's positions only: the prefix is in the cache
    assert not torch.allclose(mine.logits, plain, atol=1e-3)  # the prefix is read
    torch.testing.assert_close(mine.logits, library.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.loss, library.loss, atol=1e-6, rtol=0)
    mine.loss.backward()
    library.loss.backward()
    for (name, p), q in zip(
        ours.prompt_encoder.named_parameters(), theirs.prompt_encoder["default"].parameters(), strict=True
    ):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("num_virtual_tokens", "encoder_hidden_size"), CASES, ids=CASE_IDS)
def test_same_training_steps_give_the_same_prefix(num_virtual_tokens, encoder_hidden_size):
    theirs, ours = pair(num_virtual_tokens, encoder_hidden_size)
    start = prefix_tuning_state_dict(ours)["prompt_embeddings"]
    ids = padded_batch()["input_ids"]
    adamw_steps(theirs, ids)
    adamw_steps(ours, ids)
    trained = prefix_tuning_state_dict(ours)["prompt_embeddings"]
    assert not torch.equal(trained, start)
    for (name, mine), library in zip(
        ours.prompt_encoder.named_parameters(), theirs.prompt_encoder["default"].parameters(), strict=True
    ):
        torch.testing.assert_close(mine, library, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize(("num_virtual_tokens", "encoder_hidden_size"), CASES, ids=CASE_IDS)
def test_trainable_parameters_match_peft_and_the_formula(num_virtual_tokens, encoder_hidden_size):
    theirs, ours = pair(num_virtual_tokens, encoder_hidden_size)
    layers, heads, head_dim = key_value_shape(ours.config)
    row = 2 * layers * heads * head_dim  # a key and a value per layer: 2 * 2 * (2 * 8) = 64 here
    if encoder_hidden_size is None:
        formula = num_virtual_tokens * row
    else:  # the shorter vectors, then Linear(kv_dim, h) and Linear(h, row) with their biases
        kv_dim, h = heads * head_dim, encoder_hidden_size
        formula = num_virtual_tokens * kv_dim + (kv_dim + 1) * h + (h + 1) * row
    assert trainable(ours) == theirs.get_nb_trainable_parameters()[0] == formula


def test_a_prefix_from_text_is_the_model_having_read_the_text():
    """Li and Liang's start from real words: the first logits after the prefix are those after the text."""
    base, tokenizer = load_model("tiny")
    ids = tokenizer(INIT_TEXT)["input_ids"]
    review = tokenizer("the duck lives in the lake.", add_special_tokens=False, return_tensors="pt").input_ids
    model = add_prefix_tuning(copy.deepcopy(base), len(ids), tokenizer, INIT_TEXT)
    with torch.no_grad():
        after_prefix = model(review).logits
        after_text = base(torch.cat([torch.tensor([ids]), review], dim=1)).logits[:, len(ids) :]
    torch.testing.assert_close(after_prefix, after_text, atol=1e-5, rtol=0)
    # Cut short and repeated, as PEFT's prompt tuning does with its "TEXT" start.
    for n in (3, 30):
        rows = add_prefix_tuning(copy.deepcopy(base), n, tokenizer, INIT_TEXT).prompt_encoder.embedding.weight
        assert rows.shape == (n, 2 * 2 * 64)  # the tiny model: 2 layers, keys of 2 heads of 32
    with pytest.raises(ValueError, match="cannot start from text"):
        add_prefix_tuning(copy.deepcopy(base), 3, tokenizer, INIT_TEXT, encoder_hidden_size=16)


@pytest.mark.parametrize("num_virtual_tokens", [5, 21], ids=["cut-short", "the-whole-text"])
def test_the_start_from_text_is_pefts_initializer(num_virtual_tokens):
    """PEFT 0.21's initialize_kv_prefix_from_text reads the text through the frozen model and
    keeps the first keys and values, as ours does (without the chat template it wraps by default)."""
    base, tokenizer = load_model("tiny")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    theirs = get_peft_model(copy.deepcopy(base), config)
    initialize_kv_prefix_from_text(theirs, tokenizer, text=INIT_TEXT, use_chat_template=False)
    ours = add_prefix_tuning(copy.deepcopy(base), num_virtual_tokens, tokenizer, INIT_TEXT)
    torch.testing.assert_close(
        ours.prompt_encoder.embedding.weight,
        theirs.prompt_encoder["default"].embedding.weight,
        atol=1e-5,  # PEFT reads the whole text and keeps the first keys; ours reads only those
        rtol=0,
    )


@pytest.mark.parametrize("encoder_hidden_size", [None, 24], ids=["rows", "projected"])
def test_a_prefix_saved_by_us_loads_into_peft_and_pefts_save_has_its_layout(tmp_path, encoder_hidden_size):
    theirs, ours = pair(5, encoder_hidden_size, seed=2)
    adamw_steps(ours, padded_batch()["input_ids"], steps=2)  # a trained prefix, not the start
    save_prefix(ours, tmp_path / "prefix", None)
    loaded = PeftModel.from_pretrained(random_llama(), tmp_path / "prefix")
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=0)
    # PEFT's own save holds its rows, the network's output if it has one, under the same key.
    theirs.save_pretrained(tmp_path / "theirs")
    saved = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert saved.keys() == {"prompt_embeddings"}
    ours_saved = prefix_tuning_state_dict(ours)["prompt_embeddings"]
    assert saved["prompt_embeddings"].shape == ours_saved.shape == (5, 64)


def test_a_bfloat16_base_keeps_a_float32_prefix():
    _, ours = pair(5, base=random_llama().to(torch.bfloat16))
    assert ours.prompt_encoder.embedding.weight.dtype == torch.float32
    ids = padded_batch()["input_ids"]
    ours(ids, labels=ids).loss.backward()
    grad = ours.prompt_encoder.embedding.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_the_prefix_trains_and_no_base_weight_moves():
    model = add_prefix_tuning(random_llama(), 4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = padded_batch()["input_ids"].tolist()
    data = [{"input_ids": row, "labels": row} for row in ids] * 2
    train(model, data, TrainConfig(max_steps=2, batch_size=3, learning_rate=1e-2, progress=False))
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name


def test_gradient_checkpointing_is_refused_every_way_it_can_be_asked_for():
    with pytest.raises(ValueError, match="gradient checkpointing"):  # on the base, before
        base = random_llama()
        enable_gradient_checkpointing(base)
        add_prefix_tuning(base, 4)
    model = add_prefix_tuning(random_llama(), 4)
    with pytest.raises(ValueError, match="gradient checkpointing"):  # through the wrapper (the lab's loop)
        enable_gradient_checkpointing(model)
    enable_gradient_checkpointing(model.base_model)  # on the base, after: refused when it would train
    ids = padded_batch()["input_ids"]
    with torch.no_grad():
        model(ids)  # answering recomputes nothing: allowed
    with pytest.raises(ValueError, match="drops the key-value cache"):
        model.train()(ids, labels=ids)


def test_pefts_prefix_fails_with_checkpointing_turned_on_after_it():
    """What the page shows: PEFT refuses checkpointing only when the prefix is added; turned on
    later, transformers drops the cache in each recomputed layer and the mask no longer fits."""
    theirs, _ = pair(3)
    enable_gradient_checkpointing(theirs.base_model)
    ids = padded_batch()["input_ids"]
    with pytest.raises(RuntimeError, match="must match the size"):
        theirs.train()(ids, labels=ids)


def test_the_prefix_is_made_on_the_bases_device():
    """The virtual tokens' indices live with the base's weights: on a GPU, indices left on the
    CPU would fail the first lookup. The meta device stands in for a GPU here."""
    with torch.device("meta"):
        base = random_llama()
    model = add_prefix_tuning(base, 4)
    assert model.prompt_tokens.device.type == model.prompt_encoder.embedding.weight.device.type == "meta"


def test_packed_rows_are_refused():
    model = add_prefix_tuning(random_llama(), 4)
    ids = padded_batch()["input_ids"]
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(10).expand(3, -1))


def test_the_command_line_trains_and_saves_a_peft_adapter(tmp_path, capsys):
    output = tmp_path / "prefix"
    main(["--max-steps", "2", "--batch-size", "4", "--num-virtual-tokens", "3", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and f"saved to {output}" in printed
    # 3 virtual tokens, each a key and a value of 2 heads of 32 in each of the tiny model's 2 layers.
    assert load_file(output / "adapter_model.safetensors")["prompt_embeddings"].shape == (3, 2 * 2 * 64)
    base, _ = load_model("tiny")
    assert isinstance(PeftModel.from_pretrained(base, output), PeftModel)
    for bad, flag in [
        (["--num-virtual-tokens", "0"], "--num-virtual-tokens"),
        (["--gradient-checkpointing"], "--gradient-checkpointing"),
    ]:
        with pytest.raises(SystemExit):
            main(bad)
        assert flag in capsys.readouterr().err


def test_the_labs_loss_gives_the_same_loss_and_gradient():
    """The path the lab trains by: causal_lm_loss, with use_cache=False, still reads the prefix."""
    theirs, ours = pair(5)
    batch = padded_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    gradients = []
    for model, prefix in [(ours, ours.prompt_encoder), (theirs, theirs.prompt_encoder["default"])]:
        loss, targets = causal_lm_loss(model, batch)
        loss.backward()
        gradients.append((loss.detach(), targets, prefix.embedding.weight.grad))
    (mine, my_targets, my_grad), (library, their_targets, their_grad) = gradients
    assert my_targets == their_targets == int(batch["attention_mask"][:, 1:].sum())
    torch.testing.assert_close(mine, library, atol=1e-5, rtol=0)
    torch.testing.assert_close(my_grad, their_grad, atol=1e-6, rtol=0)
    assert my_grad.abs().sum() > 0
