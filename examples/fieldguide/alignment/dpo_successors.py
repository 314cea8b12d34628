"""DPO's successors: IPO, KTO, ORPO and SimPO, each a loss on the DPO page's batches.

Every one keeps DPO's setting (a fixed set of preference data, no sampling, no reward model)
and changes the loss:

* **IPO** fits each pair's log-ratio margin to a fixed target instead of pushing it to
  infinity; it keeps the reference.
* **KTO** needs no pairs: one response and a thumbs up or down; it keeps the reference, and a
  batch estimate of the policy's KL from it is the point a response's gain is measured from.
* **ORPO** drops the reference: supervised fine-tuning on the chosen response plus a term on
  the odds ratio of chosen to rejected.
* **SimPO** drops the reference too: DPO's loss on the responses' mean log-probability per
  token, with a target margin.

Run one of them::

    fieldguide dpo-successors --method orpo

On the lab's tiny model it starts from the SFT policy of ``fieldguide.lab.preferences``; with
``--model`` it starts from that model and aligns it to the same pairs.
"""

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fieldguide.alignment.dpo import chat_rows, dpo_loss_fn, finite_beta, mean_logprobs
from fieldguide.lab.cache import cached
from fieldguide.lab.chat import require_chat_template
from fieldguide.lab.cli import (
    TINY,
    add_chat_arguments,
    add_training_arguments,
    example_parser,
    main_guard,
    training_config,
)
from fieldguide.lab.experiment import Presets, Technique, frozen_copy, real_model_training, run_technique
from fieldguide.lab.loading import parse_and_load, save_if_asked
from fieldguide.lab.metrics import preference_outcomes
from fieldguide.lab.preferences import (
    alignment_task,
    collate_pairs,
    encode_pair,
    frozen_reference,
    rule_outcomes,
    sampled_kl,
    sft_policy_run,
    token_logprobs,
    well_formed_share,
)
from fieldguide.lab.records import recorded
from fieldguide.lab.stats import wilson_interval
from fieldguide.lab.training import TrainConfig
from fieldguide.lab.trl_arguments import trl_arguments


@dataclass(frozen=True)
class Method:
    """One loss and the settings the page runs it with."""

    strength: float  # DPO's and KTO's beta, IPO's tau, ORPO's lambda, SimPO's beta
    reference_free: bool  # ORPO and SimPO need no reference model
    margin_ratio: float = 0.0  # SimPO's gamma_SimPO / beta: its target margin in nats per token
    sft_weight: float = 0.0  # DPO's NLL term (the DPO page's recipe)


METHODS = {  # each at its paper's or TRL's default strength; see the page
    "DPO": Method(strength=0.1, reference_free=False),
    "DPO + NLL": Method(strength=0.1, reference_free=False, sft_weight=1.0),
    "IPO": Method(strength=0.1, reference_free=False),  # TRL's default tau
    "KTO": Method(strength=0.1, reference_free=False),  # KTO's default beta, and TRL's
    "ORPO": Method(strength=0.1, reference_free=True),  # ORPO's lambda, and TRL's
    "SimPO": Method(strength=2.0, reference_free=True, margin_ratio=0.5),  # the authors' starting point
}

PRESETS = Presets(  # the DPO page's: 200 steps of 16 pairs (KTO: of their 32 responses, unpaired)
    tiny=TrainConfig(max_steps=200, batch_size=16, learning_rate=3e-4, warmup_steps=10),
    real=real_model_training(max_steps=200, learning_rate=1e-6),
)


# -- The losses, per pair (KTO: per response) ------------------------------------------------


def ipo_loss(chosen_logratios, rejected_logratios, tau: float) -> torch.Tensor:
    """IPO's squared loss, equation (eq-ipo-loss): the margin of the log-ratios, per token,
    fitted to 1 / (2 tau), which a margin can overshoot as well as fall short of."""
    return (chosen_logratios - rejected_logratios - 1 / (2 * tau)) ** 2


def kto_loss(logratios, desirable, reference_point, beta: float) -> torch.Tensor:
    """KTO's loss per response, equation (eq-kto-loss): 1 - sigmoid(gain) for a desirable
    response, 1 - sigmoid(-gain) for an undesirable one, the gain measured from the reference
    point; the paper's weights of the two kinds at 1."""
    gain = beta * (logratios - reference_point)
    return torch.where(desirable, 1 - torch.sigmoid(gain), 1 - torch.sigmoid(-gain))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without the rounding of 1 - e^x near x = 0 or x = -inf."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean_logps, rejected_mean_logps) -> torch.Tensor:
    """ORPO's odds-ratio term, equation (eq-orpo-loss): -log sigmoid(log odds(y_w) - log
    odds(y_l)), where odds = p / (1 - p) of p, the probability per token (eq-orpo-odds)."""
    log_odds_ratio = (chosen_mean_logps - log1mexp(chosen_mean_logps)) - (
        rejected_mean_logps - log1mexp(rejected_mean_logps)
    )
    return -F.logsigmoid(log_odds_ratio)


def simpo_loss(chosen_mean_logps, rejected_mean_logps, beta: float, margin: float) -> torch.Tensor:
    """SimPO's loss, equation (eq-simpo-loss): DPO's, on the mean log-probability per token
    with no reference, less a target margin."""
    return -F.logsigmoid(beta * (chosen_mean_logps - rejected_mean_logps) - margin)


# -- The loss functions the harness calls -----------------------------------------------------


def per_token_mean(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each row's response log-probability divided by its length in tokens. (N,)"""
    return per_token.sum(dim=-1) / batch["completion_mask"][:, 1:].sum(dim=-1)


def ipo_loss_fn(reference, tau: float):
    """IPO on a batch of pairs, log-ratios averaged per token (as TRL's ``loss_type="ipo"``)."""

    def loss(model, batch):
        policy = per_token_mean(token_logprobs(model, batch), batch)
        with torch.no_grad():
            reference_logps = per_token_mean(token_logprobs(reference, batch), batch)
        chosen_logratios, rejected_logratios = (policy - reference_logps).chunk(2)
        losses = ipo_loss(chosen_logratios, rejected_logratios, tau)
        return losses.sum(), len(losses), {"margin": (chosen_logratios - rejected_logratios).detach().mean()}

    return loss


def kto_loss_fn(reference, beta: float):
    """KTO on a batch of single responses: the reference point z0 is the policy's KL from the
    reference on mismatched (prompt, response) rows, a batch mean, clipped at 0, no gradient."""

    def loss(model, batch):
        policy = token_logprobs(model, batch).sum(dim=-1)  # (N,), the one forward pass with a graph
        mismatched = {key[3:]: value for key, value in batch.items() if key.startswith("KL_")}
        with torch.no_grad():
            reference_logps = token_logprobs(reference, batch).sum(dim=-1)
            kl = token_logprobs(model, mismatched).sum(-1) - token_logprobs(reference, mismatched).sum(-1)
            reference_point = kl.mean().clamp(min=0)
        losses = kto_loss(policy - reference_logps, batch["label"], reference_point, beta)
        return losses.sum(), len(losses), {"reference point": reference_point}

    return loss


def orpo_loss_fn(lam: float, prompt_in_nll: bool = False):
    """ORPO on a batch of pairs: the chosen responses' NLL per token plus ``lam`` times the
    mean odds-ratio term. ``prompt_in_nll`` counts the chosen rows' prompt tokens in the NLL
    too, as TRL's ``ORPOTrainer`` does."""

    def loss(model, batch):
        nll_mask = batch["attention_mask"] if prompt_in_nll else batch["completion_mask"]
        every_token = token_logprobs(model, {**batch, "completion_mask": nll_mask})  # one forward pass
        per_token = every_token * batch["completion_mask"][:, 1:]  # the responses' tokens alone
        chosen, rejected = per_token_mean(per_token, batch).chunk(2)
        pairs = len(chosen)
        nll = -every_token[:pairs].sum() / nll_mask[:pairs, 1:].sum()
        losses = nll + lam * orpo_loss(chosen, rejected)  # the harness averages: nll + lam * mean
        return losses.sum(), pairs, {"nll": nll.detach()}

    return loss


def simpo_loss_fn(beta: float, margin: float):
    """SimPO on a batch of pairs: no reference model, no forward pass but the policy's."""

    def loss(model, batch):
        chosen, rejected = per_token_mean(token_logprobs(model, batch), batch).chunk(2)
        losses = simpo_loss(chosen, rejected, beta, margin)
        return losses.sum(), len(losses), {"margin": (chosen - rejected).detach().mean()}

    return loss


def loss_function(name: str, method: Method, reference):
    """The harness's loss function for one of ``METHODS``."""
    if name.startswith("DPO"):
        return dpo_loss_fn(reference, method.strength, method.sft_weight)
    return {
        "IPO": lambda: ipo_loss_fn(reference, method.strength),
        "KTO": lambda: kto_loss_fn(reference, method.strength),
        "ORPO": lambda: orpo_loss_fn(method.strength),
        "SimPO": lambda: simpo_loss_fn(method.strength, method.strength * method.margin_ratio),
    }[name]()


# -- KTO's data: single responses, each with a thumbs up or down -----------------------------


def unpaired(encoded_pairs: list[dict]) -> list[dict]:
    """Each pair as two single responses: the chosen one desirable, the rejected one not
    (every chosen response, then every rejected one, in TRL's order)."""
    return [
        {"prompt_ids": pair["prompt_ids"], "completion_ids": pair[side], "label": side == "chosen_ids"}
        for side in ("chosen_ids", "rejected_ids")
        for pair in encoded_pairs
    ]


def _right_padded(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int) -> dict:
    """Rows of prompt then response, padded on the right, with the masks ``token_logprobs`` reads."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks]),
    }


def collate_unpaired(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """KTO's batch, in TRL's layout: the rows, their labels, and ``KL_`` rows that put each
    prompt before the previous row's response (a response to another request)."""
    prompts = [example["prompt_ids"] for example in examples]
    completions = [example["completion_ids"] for example in examples]
    mismatched = completions[-1:] + completions[:-1]
    batch = _right_padded(prompts, completions, pad_token_id)
    batch |= {f"KL_{key}": value for key, value in _right_padded(prompts, mismatched, pad_token_id).items()}
    return batch | {"label": torch.tensor([example["label"] for example in examples])}


# -- Side by side on the lab's task ---------------------------------------------------------


def successor(name: str, method: Method, reference, pad_token_id: int, measured_against=None) -> Technique:
    """One of ``METHODS`` on the lab's training pairs, scored by the rule on the held-out
    requests; the KL is measured against ``measured_against`` (the reference if not given)."""
    task, baseline = alignment_task(), measured_against or reference
    heldout, prompts = task.pairs.heldout, [request.prompt for request in task.requests.heldout]
    measures = {
        "pair accuracy": lambda model, tok: sum(preference_outcomes(model, tok, heldout)) / len(heldout),
        "well-formed answers": lambda model, tok: well_formed_share(model, tok, task.requests.heldout),
        "chosen log-likelihood": lambda model, tok: mean_logprobs(model, tok, heldout)[0],
        "rejected log-likelihood": lambda model, tok: mean_logprobs(model, tok, heldout)[1],
    }
    if baseline is not None:  # a reference-free run from the command line keeps no second model
        measures["KL to the reference"] = lambda model, tok: sampled_kl(model, baseline, tok, prompts)
    encode_train = lambda tok: [encode_pair(tok, pair) for pair in task.pairs.train]
    collate = collate_unpaired if name == "KTO" else collate_pairs
    return Technique(
        data=(lambda tok: unpaired(encode_train(tok))) if name == "KTO" else encode_train,
        score=lambda model, tok: rule_outcomes(model, tok, task.requests.heldout),
        loss=loss_function(name, method, reference),
        collate=lambda examples: collate(examples, pad_token_id),
        measures=measures,
    )


def config_for(name: str, config: TrainConfig) -> TrainConfig:
    """KTO sees a pair's two responses as two examples: twice the batch, the same data a step."""
    return replace(config, batch_size=config.batch_size * 2) if name == "KTO" else config


@recorded
@cached
def run_successors(seed: int = 0):
    """Every method of ``METHODS`` from the SFT policy, one after the other, in one run."""
    sft = sft_policy_run()
    reference, runs = frozen_copy(sft.model), {}
    for name, method in METHODS.items():
        own_reference = None if method.reference_free else reference
        technique = successor(name, method, own_reference, sft.tokenizer.pad_token_id, reference)
        config = config_for(name, replace(PRESETS.tiny, seed=seed))
        runs[name] = run_technique(technique, copy.deepcopy(sft.model), sft.tokenizer, config)
    return runs


def successors_table(runs: dict) -> str:
    """The runs as a table: the rule's held-out score and the held-out pairs' accuracy with
    95% intervals, the share of well-formed answers, the KL from the SFT policy (nats per
    answer), and the held-out pairs' mean log-likelihoods, chosen and rejected (nats)."""
    pairs = len(alignment_task().pairs.heldout)
    lines = [
        f"{'':9} {'rule score (95% CI)':>20} {'pair accuracy':>21} {'formed':>6} {'KL':>5} {'chosen':>6} {'rejected':>8}"
    ]
    for name, run in runs.items():
        accuracy = run.measures["pair accuracy"][1]
        low, high = wilson_interval(round(accuracy * pairs), pairs)
        after, measure = run.after, {key: values[1] for key, values in run.measures.items()}
        lines.append(
            f"{name:9} {after.value:6.3f} ({after.low:.3f}-{after.high:.3f}) {accuracy:6.3f} ({low:.3f}-{high:.3f})"
            f" {measure['well-formed answers']:6.3f} {measure['KL to the reference']:5.1f}"
            f" {measure['chosen log-likelihood']:6.1f} {measure['rejected log-likelihood']:8.1f}"
        )
    return "\n".join(lines)


# -- The same with TRL -----------------------------------------------------------------------


def trl_trainer(name: str, policy, reference, tokenizer, pairs, config: TrainConfig, output_dir: str):
    """TRL's trainer for one of ``METHODS`` on the same pairs, at the same strength: IPO in
    ``DPOTrainer``, KTO in ``KTOTrainer`` (each pair unpaired, chosen before rejected), ORPO
    and SimPO in ``trl.experimental``'s ``ORPOTrainer`` and ``CPOTrainer``."""
    import trl  # imported here: TRL is heavy, and only this function needs it
    from datasets import Dataset

    method, rows, common = METHODS[name], chat_rows(tokenizer, pairs), trl_arguments(config, output_dir)
    if name == "KTO":
        rows = [
            {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
            for side in ("chosen", "rejected")
            for row in rows
        ]
    if name in ("IPO", "KTO"):
        trainer_class, args = {
            "IPO": (trl.DPOTrainer, trl.DPOConfig(**common, beta=method.strength, loss_type=["ipo"])),
            "KTO": (trl.KTOTrainer, trl.KTOConfig(**common, beta=method.strength)),
        }[name]
        extra = {"ref_model": reference}
    elif name == "ORPO":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer_class, args, extra = (
            ORPOTrainer,
            ORPOConfig(**common, beta=method.strength, remove_unused_columns=False),
            {},
        )
    else:  # SimPO: CPO's trainer with its behaviour-cloning term off
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(
            **common,
            loss_type="simpo",
            beta=method.strength,
            simpo_gamma=method.strength * method.margin_ratio,
            cpo_alpha=0.0,
            remove_unused_columns=False,
        )
        trainer_class, extra = CPOTrainer, {}
    return trainer_class(
        model=policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **extra
    )


# -- The command ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Align a model to the lab's preference pairs with IPO, KTO, ORPO or SimPO.")
    add_training_arguments(parser, PRESETS)
    names = {name.lower(): name for name in METHODS if not name.startswith("DPO")}  # ipo: IPO
    parser.add_argument(
        "--method",
        type=str.lower,
        choices=names,
        default="orpo",
        help="the loss (KTO takes each pair apart: a micro-batch holds twice --batch-size responses)",
    )
    parser.add_argument(
        "--strength",
        type=finite_beta,
        help="beta (KTO; SimPO, keeping gamma / beta at 0.5), tau (IPO) or lambda (ORPO); "
        "default: the page's value for the method",
    )
    add_chat_arguments(parser)
    args, model, tokenizer = parse_and_load(parser, argv)
    require_chat_template(tokenizer, args.chat_template)
    if args.model == TINY:  # alignment starts from an instruction-tuned model: the SFT policy
        model = copy.deepcopy(sft_policy_run().model).to(args.device)
    name = names[args.method]
    method = METHODS[name] if args.strength is None else replace(METHODS[name], strength=args.strength)
    reference = None if method.reference_free else frozen_reference(model)
    run = run_technique(
        successor(name, method, reference, tokenizer.pad_token_id),
        model,
        tokenizer,
        config_for(name, training_config(args, PRESETS)),
        keep_model=True,
    )
    print(run.report("held-out requests answered with a good review"))
    save_if_asked(args.output, run.model, tokenizer)


if __name__ == "__main__":
    main_guard(main)
