"""DPO's successors: each loss equal to TRL's trainer on the same batch, its gradient too; each
loss's defining property; KTO's batches; the command line."""

import copy
import math

import pytest
import torch

from fieldguide.alignment import dpo_successors as successors
from fieldguide.alignment.dpo_successors import (
    METHODS,
    collate_unpaired,
    ipo_loss,
    kto_loss,
    kto_loss_fn,
    log1mexp,
    loss_function,
    main,
    orpo_loss,
    orpo_loss_fn,
    simpo_loss,
    trl_trainer,
    unpaired,
)
from fieldguide.lab.experiment import frozen_copy
from fieldguide.lab.loading import load_model
from fieldguide.lab.preferences import alignment_task, collate_pairs, encode_pair, token_logprobs
from fieldguide.lab.training import TrainConfig
from lab_factories import small_alignment_task
from model_families import save_family_model


def policy_and_reference(family, tmp_path, seed=0):
    """A policy nudged away from its reference, so that the log-ratios are not zero. Each
    case gets a reference of its own: TRL's trainers change the reference they are given."""
    model, tokenizer = load_model("tiny" if family == "lab" else save_family_model(family, tmp_path / family))
    reference = frozen_copy(model)
    policy = copy.deepcopy(model).train().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return policy, reference, tokenizer


def in_our_layout(trainer, batch) -> dict:
    """ORPO's and CPO's batch (chosen and rejected tensors apart) as the lab's: chosen rows,
    then rejected rows, a completion mask where the labels count. The tokens are TRL's own."""
    pad = getattr(trainer, "padding_value", None)  # ORPO's name for it
    pad = trainer.pad_token_id if pad is None else pad  # CPO's
    joined = trainer.concatenated_inputs(
        batch, is_encoder_decoder=False, padding_value=pad, device=torch.device("cpu")
    )
    return {
        "input_ids": joined["concatenated_input_ids"],
        "attention_mask": joined["concatenated_attention_mask"],
        "completion_mask": (joined["concatenated_labels"] != -100).long(),
    }


CASES = [  # method, model family, pairs, noise seed (KTO's reference point is 0 at seed 0, above it at 2)
    ("IPO", "lab", 1, 0),
    ("IPO", "lab", 4, 0),
    ("IPO", "qwen2", 3, 0),
    ("KTO", "lab", 4, 0),
    ("KTO", "lab", 4, 2),
    ("KTO", "qwen2", 3, 0),
    ("ORPO", "lab", 1, 0),
    ("ORPO", "lab", 4, 0),
    ("ORPO", "qwen2", 3, 0),
    ("SimPO", "lab", 4, 0),
    ("SimPO", "qwen2", 3, 0),
]


@pytest.mark.parametrize(("name", "family", "num_pairs", "seed"), CASES)
def test_our_loss_and_gradient_equal_trls_on_the_same_batch(name, family, num_pairs, seed, tmp_path):
    policy, reference, tokenizer = policy_and_reference(family, tmp_path, seed)
    pairs = alignment_task().pairs.train[:num_pairs]
    rows = 2 * num_pairs if name == "KTO" else num_pairs
    trainer = trl_trainer(
        name, policy, reference, tokenizer, pairs, TrainConfig(max_steps=1, batch_size=rows), str(tmp_path)
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    theirs = trainer.compute_loss(policy, batch)
    (theirs_grad,) = torch.autograd.grad(theirs, [policy.lm_head.weight])
    if name == "ORPO":  # TRL's NLL counts the prompt's tokens; ours can
        loss = orpo_loss_fn(METHODS["ORPO"].strength, prompt_in_nll=True)
    else:
        loss = loss_function(name, METHODS[name], reference)
    total, count, logs = loss(policy, in_our_layout(trainer, batch) if name in ("ORPO", "SimPO") else batch)
    ours = total / count
    (ours_grad,) = torch.autograd.grad(ours, [policy.lm_head.weight])
    assert abs(ours.item() - theirs.item()) <= 1e-6 * max(1.0, abs(theirs.item()))
    assert (ours_grad - theirs_grad).abs().max() <= 1e-5 * theirs_grad.abs().max()
    if name == "KTO":  # the reference point, which TRL logs as "kl"
        assert abs(logs["reference point"].item() - trainer._metrics["train"]["kl"][-1]) < 1e-5
        if family == "lab":  # the lab's model is the same in every run, so the clipping is known
            assert (logs["reference point"].item() > 0) == (seed == 2)


@pytest.mark.parametrize("name", ["IPO", "KTO"])
def test_our_batches_equal_trls_for_the_labs_chat_template(name, tmp_path):
    policy, reference, tokenizer = policy_and_reference("lab", tmp_path)
    pairs = alignment_task().pairs.heldout[:5]
    encoded = [encode_pair(tokenizer, pair) for pair in pairs]
    ours = (
        collate_unpaired(unpaired(encoded), tokenizer.pad_token_id)
        if name == "KTO"
        else collate_pairs(encoded, tokenizer.pad_token_id)
    )
    rows = len(ours["label"]) if name == "KTO" else len(pairs)  # the data set's rows
    trainer = trl_trainer(
        name, policy, reference, tokenizer, pairs, TrainConfig(max_steps=1, batch_size=rows), str(tmp_path)
    )
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def trl_and_lab_rows(name, family, tmp_path, num_pairs=4):
    """The rows TRL's ORPO or CPO trainer makes of held-out pairs, and the lab's, as
    (tokens, completion mask) without padding; and the tokenizer."""
    policy, reference, tokenizer = policy_and_reference(family, tmp_path)
    pairs = alignment_task().pairs.heldout[:num_pairs]
    config = TrainConfig(max_steps=1, batch_size=num_pairs)
    trainer = trl_trainer(name, policy, reference, tokenizer, pairs, config, str(tmp_path))
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(num_pairs)])
    ours = collate_pairs([encode_pair(tokenizer, pair) for pair in pairs], tokenizer.pad_token_id)
    return _rows(in_our_layout(trainer, theirs)), _rows(ours), tokenizer


def _rows(batch) -> list[tuple[list[int], list[int]]]:
    """Each row's tokens and completion mask, padding dropped."""
    keep = batch["attention_mask"].bool()
    return [
        (ids[row_keep].tolist(), mask[row_keep].tolist())
        for ids, mask, row_keep in zip(batch["input_ids"], batch["completion_mask"], keep, strict=True)
    ]


@pytest.mark.parametrize("name", ["ORPO", "SimPO"])
def test_orpo_and_cpo_tokenize_the_labs_chats_as_the_lab_does(name, tmp_path):
    """TRL's ORPO and CPO trainers tokenize text themselves; for the lab's template their rows
    are the lab's, token for token, with the same response tokens counted."""
    theirs, ours, _ = trl_and_lab_rows(name, "lab", tmp_path)
    assert theirs == ours


@pytest.mark.parametrize("name", ["ORPO", "SimPO"])
def test_orpo_and_cpo_train_chatml_responses_on_an_extra_newline_and_end_of_turn(name, tmp_path):
    """With ChatML (Qwen2's template), TRL's ORPO and CPO trainers take the template's newline
    after ``<|im_end|>`` into the response and append the EOS token, ``<|im_end|>`` again:
    they train on two tokens that the lab's batches, and the model's chats, do not have."""
    theirs, ours, tokenizer = trl_and_lab_rows(name, "qwen2", tmp_path)
    extra = tokenizer("\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(extra) == "\n<|im_end|>"
    assert theirs == [(ids + extra, [*mask, 1, 1]) for ids, mask in ours]


def test_kto_pairs_each_prompt_with_the_previous_rows_response(tiny):
    _, tokenizer = tiny
    examples = unpaired([encode_pair(tokenizer, pair) for pair in alignment_task().pairs.train[:3]])
    batch = collate_unpaired(examples, tokenizer.pad_token_id)
    assert batch["label"].tolist() == [True, True, True, False, False, False]
    for row, example in enumerate(examples):
        previous = examples[row - 1]["completion_ids"]
        mismatched = batch["KL_input_ids"][row][batch["KL_attention_mask"][row].bool()].tolist()
        assert mismatched == example["prompt_ids"] + previous
        assert batch["KL_completion_mask"][row].sum() == len(previous)


def test_ipo_is_least_where_the_margin_meets_its_target():
    tau = 0.25
    margins = torch.tensor([0.0, 1 / (2 * tau), 4.0])
    losses = ipo_loss(margins, torch.zeros(3), tau)
    assert losses[1].item() == 0.0 and losses[0] > 0 and losses[2] > 0  # a margin past it is pulled back


def test_kto_scores_a_response_by_its_gain_over_the_reference_point():
    logratios = torch.tensor([0.5, 0.5, 2.0, 2.0])
    desirable = torch.tensor([True, False, True, False])
    losses = kto_loss(logratios, desirable, reference_point=torch.tensor(0.5), beta=1.0)
    assert torch.allclose(losses[:2], torch.tensor([0.5, 0.5]))  # at the reference point: no gain
    assert losses[2] < 0.5 < losses[3]  # a gain helps a desirable response and hurts an undesirable one
    assert torch.allclose(losses[2] + losses[3], torch.tensor(1.0))


def test_kto_takes_no_gradient_through_its_reference_point(tiny):
    model, tokenizer = tiny
    policy, reference = copy.deepcopy(model).requires_grad_(True), frozen_copy(model)
    examples = unpaired([encode_pair(tokenizer, pair) for pair in alignment_task().pairs.train[:2]])
    batch = collate_unpaired(examples, tokenizer.pad_token_id)
    total, _, logs = kto_loss_fn(reference, beta=0.1)(policy, batch)
    assert not logs["reference point"].requires_grad
    assert total.requires_grad  # the gradient reaches the policy through the rows' own log-ratios


def test_log1mexp_is_exact_at_both_ends():
    x = torch.tensor([-1e-7, -0.5, -0.7, -30.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x.float()).double(), torch.log(1 - torch.exp(x)), rtol=1e-6)


def test_orpo_and_simpo_treat_equal_responses_as_their_formulas_say():
    equal = torch.tensor([-1.2, -3.0])
    assert torch.allclose(orpo_loss(equal, equal), torch.full((2,), math.log(2)))
    margin = 1.0  # SimPO asks for more than a tie: a tie costs log(1 + e^margin)
    assert torch.allclose(
        simpo_loss(equal, equal, beta=2.0, margin=margin), torch.full((2,), math.log1p(math.e))
    )


def test_orpo_nll_counts_the_prompt_only_when_asked(tiny):
    model, tokenizer = tiny
    batch = collate_pairs([encode_pair(tokenizer, alignment_task().pairs.train[0])], tokenizer.pad_token_id)
    _, _, response_only = orpo_loss_fn(0.1)(model, batch)
    _, _, with_prompt = orpo_loss_fn(0.1, prompt_in_nll=True)(model, batch)
    chosen = {key: value[:1] for key, value in batch.items()}
    expected = -token_logprobs(model, chosen).sum() / chosen["completion_mask"][:, 1:].sum()
    assert torch.allclose(response_only["nll"], expected)
    assert not torch.allclose(with_prompt["nll"], expected)


@pytest.mark.parametrize(
    ("argument", "value"), [("--strength", "0"), ("--strength", "nan"), ("--method", "dpo")]
)
def test_a_bad_argument_is_refused_in_one_line(argument, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([argument, value])
    assert exit_info.value.code == 2
    assert f"argument {argument}" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["KTO", "SimPO"])
def test_the_command_aligns_the_tiny_model_and_prints_its_report(method, capsys, monkeypatch):
    monkeypatch.setattr(successors, "alignment_task", small_alignment_task)
    main(["--method", method, "--max-steps", "2", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert "held-out requests answered with a good review before" in out and "pair accuracy" in out
