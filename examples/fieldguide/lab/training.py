"""One training loop for every from-scratch example on the site.

It does the four things a real fine-tuning loop must get right and a short loop usually gets
wrong: gradient accumulation whose loss is normalised over every target token of the step,
checkpoints that resume to bit-identical weights, a clear error when the loss stops being a
number, and a progress bar that stays quiet when nobody is watching.
"""

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from fieldguide.lab.data import IGNORE_INDEX, pad_batch

# A loss function returns the *sum* of the per-target losses of a batch and how many targets
# there were. The loop divides by the total count of the whole step (see `train`).
LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training cannot recover from that by itself."""


@dataclass(frozen=True)  # frozen: a config can key a cache, and is changed only by replace()
class TrainConfig:
    max_steps: int = 200  # optimizer steps to take in all
    batch_size: int = 16  # examples in one micro-batch (one forward and backward pass)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup_steps: int = 0  # steps of linear warm-up before the cosine decay
    max_grad_norm: float | None = 1.0  # clip the gradient's global norm to this; None: never
    bf16: bool = False  # run forward and backward under bfloat16 autocast; weights stay float32
    gradient_checkpointing: bool = False  # keep fewer activations, recompute them in backward
    seed: int = 0  # the run's one seed: the data it draws, any new weights, the order of examples
    checkpoint_dir: Path | None = None  # where checkpoints go; None: no checkpoints
    checkpoint_every: int = 0  # save after every this many steps; 0: never
    progress: bool | None = None  # progress bar; None: only when stderr is a terminal
    log_every: int = 0  # without a progress bar, a line on stderr every this many steps; 0: never


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's generators: the one place a run's seed is applied."""
    transformers.set_seed(seed)


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the targets that are not ``IGNORE_INDEX``.

    A batch of packed rows carries ``position_ids`` instead of an ``attention_mask`` (see the
    instruction tuning page); whichever the batch has is passed on.
    """
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
    # A soft prompt (prompt tuning, prefix methods) puts positions before the input; they
    # predict no input token, so only the last T positions are kept.
    logits = logits[:, -batch["input_ids"].shape[1] :]
    # Position t predicts token t+1: drop the last prediction and the first label.
    predictions = logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
    targets = batch["labels"][:, 1:].flatten()  # (B*(T-1),)
    loss_sum = F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((targets != IGNORE_INDEX).sum())


def micro_batches(dataset: list, batch_size: int, seed: int, start: int = 0) -> Iterator[list]:
    """Endless micro-batches, reshuffled every epoch, beginning at micro-batch ``start``.

    The order depends only on ``seed`` and the position, never on earlier draws, so a resumed
    run sees exactly the batches an uninterrupted run would have seen.
    """
    per_epoch = len(dataset) // batch_size  # drop the ragged tail so all batches are full
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} examples cannot fill one batch of {batch_size}")
    index = start
    while True:
        epoch, position = divmod(index, per_epoch)
        if position == 0 or index == start:  # a new epoch, or the first draw: new order
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        chosen = order[position * batch_size : (position + 1) * batch_size]
        yield [dataset[i] for i in chosen]
        index += 1


def cosine_schedule(config: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10% of the peak."""

    # A run shorter than twice its warm-up (say, --max-steps 10 with a preset's 30) warms up for
    # half of its steps, so that it reaches its peak rate at all.
    warmup = min(config.warmup_steps, config.max_steps // 2)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.max_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, losses: list) -> None:
    """Write weights (safetensors) and the optimizer's state, replacing any older checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    state = {"step": step, "losses": losses, "optimizer": optimizer.state_dict()}
    state["scheduler"] = scheduler.state_dict()
    # Written under a temporary name first, so a crash mid-write leaves the old one intact.
    torch.save(state, directory / "trainer_state.tmp")
    (directory / "trainer_state.tmp").replace(directory / "trainer_state.pt")


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> tuple[int, list]:
    """Restore a checkpoint into the given objects; return its step and loss history."""
    load_model(model, str(directory / "model.safetensors"), device=str(_device_of(model)))
    state = torch.load(directory / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], list(state["losses"])


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# Where the examples of each micro-batch come from: by default ``micro_batches``, shuffled
# draws from the data set. A method that learns from its own samples (PPO) passes a sampler
# that draws prompts, generates from the model and yields the experience, several times over.
# (model, dataset, config, start) -> micro-batches of examples, from micro-batch ``start`` on
Sampler = Callable[[torch.nn.Module, list, TrainConfig, int], Iterator[list]]


def shuffled(model: torch.nn.Module, dataset: list, config: TrainConfig, start: int) -> Iterator[list]:
    """The default sampler: ``micro_batches`` from micro-batch ``start`` on."""
    return micro_batches(dataset, config.batch_size, config.seed, start=start)


def adamw(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    """The default optimizer: AdamW with the config's peak rate and weight decay."""
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def train(
    model: torch.nn.Module,
    dataset: list[dict],
    config: TrainConfig,
    loss_fn: LossFn = causal_lm_loss,
    collate: Callable[[list], dict] | None = None,
    sampler: Sampler = shuffled,
    make_optimizer: Callable[[list, TrainConfig], torch.optim.Optimizer] = adamw,
) -> list[float]:
    """Train ``model`` on ``dataset``; return the loss of every optimizer step.

    With ``config.checkpoint_dir`` set, a checkpoint found there is resumed from. ``sampler``
    and ``make_optimizer`` replace how micro-batches are drawn and which optimizer updates the
    trainable parameters (an 8-bit or paged AdamW, other rates for some parameter groups).
    """
    if collate is None:  # pad with the model's own pad token (any id works: padding is masked)
        pad_id = getattr(model.config, "pad_token_id", None) or 0
        collate = lambda examples: pad_batch(examples, pad_id)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config))
    step, losses = _resume(config, model, optimizer, scheduler)
    batches = sampler(model, dataset, config, step * config.grad_accum_steps)
    show = sys.stderr.isatty() if config.progress is None else config.progress
    model.train()
    with tqdm(total=config.max_steps, initial=step, disable=not show, desc="train") as bar:
        while step < config.max_steps:
            micro = [collate(next(batches)) for _ in range(config.grad_accum_steps)]
            losses.append(_take_step(model, micro, loss_fn, step, config, optimizer, scheduler))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if not show and config.log_every and step % config.log_every == 0:  # a log, not a terminal
                print(f"  step {step}/{config.max_steps}, loss {losses[-1]:.3f}", file=sys.stderr)
            if (
                config.checkpoint_dir is not None
                and config.checkpoint_every
                and step % config.checkpoint_every == 0
            ):
                save_checkpoint(config.checkpoint_dir, model, optimizer, scheduler, step, losses)
    model.eval()
    return losses


def _resume(config: TrainConfig, model, optimizer, scheduler) -> tuple[int, list]:
    """The step and loss history of a checkpoint in ``config.checkpoint_dir``; (0, []) if none."""
    checkpoint = config.checkpoint_dir
    if checkpoint is not None and (checkpoint / "trainer_state.pt").exists():
        return load_checkpoint(checkpoint, model, optimizer, scheduler)
    return 0, []


def _take_step(
    model, micro: list[dict], loss_fn: LossFn, step: int, config: TrainConfig, optimizer, scheduler
) -> float:
    """One optimizer step over the micro-batches ``micro``: gradients, clipping, update, schedule."""
    with torch.autocast(_device_of(model).type, dtype=torch.bfloat16, enabled=config.bf16):
        loss = accumulate_gradients(model, micro, loss_fn, step)
    if config.max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Keep only each layer's input in the forward pass; recompute the rest during backward."""
    # The non-reentrant variant also works when no input requires a gradient (a frozen
    # embedding, as in LoRA), which the older reentrant one silently does not.
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        raise ValueError(
            f"gradient checkpointing needs a transformers model; {type(model).__name__} cannot recompute "
            "its activations"
        )


def accumulate_gradients(model, micro: list[dict], loss_fn: LossFn = causal_lm_loss, step: int = 0) -> float:
    """Forward and backward every micro-batch of one step; leave the step's mean gradient.

    Each micro-batch contributes the gradient of its loss *sum*; dividing the accumulated
    gradient by the step's total target count afterwards gives exactly the gradient of the
    mean over all targets, however the targets are spread over the micro-batches. (Averaging
    per micro-batch would over-weight tokens in short batches.)
    """
    device = _device_of(model)
    total_loss, total_targets = 0.0, 0
    for index, batch in enumerate(micro):
        # Tensors go to the model's device; anything else (reference answers, a token count)
        # reaches the loss function as it is.
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        loss_sum, targets = loss_fn(model, batch)
        if not torch.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"loss is {loss_sum.item()} at step {step}, micro-batch {index}: "
                "lower the learning rate or look for broken examples in the data"
            )
        loss_sum.backward()
        total_loss += loss_sum.item()
        total_targets += targets
    if total_targets == 0:
        raise ValueError(f"step {step} has no targets: every label in its batches is masked")
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= total_targets
    return total_loss / total_targets
