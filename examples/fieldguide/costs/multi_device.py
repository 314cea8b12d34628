"""Training on several devices: data parallelism (DDP) and sharded training (FSDP), one script.

Every process, a *rank*, runs this same script on its own device. Each optimizer step takes
one global batch of examples, the same on every rank, and each rank trains on its share:

* **DDP** keeps a whole copy of the model on every rank and, during the backward pass,
  averages the gradients over the ranks, so every copy takes the same step;
* **FSDP** keeps only a shard of every parameter, gradient and optimizer state on each rank,
  gathering a layer's full weights just while it computes.

Launched alone it is the single-process run that both must match. On the lab's tiny model,
with LoRA, on the CPU::

    python -m fieldguide.costs.multi_device --output one.safetensors
    torchrun --nproc-per-node 2 -m fieldguide.costs.multi_device --strategy ddp --output ddp.safetensors
    torchrun --nproc-per-node 2 -m fieldguide.costs.multi_device --strategy fsdp --output fsdp.safetensors

``accelerate launch`` runs it the same way (``accelerate_configs/``, beside this module, holds
config files).
"""

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fieldguide.lab.chat import encode_instructions
from fieldguide.lab.cli import TINY, example_parser, main_guard, positive_float, positive_int, require_device
from fieldguide.lab.data import pad_batch
from fieldguide.lab.loading import load_model
from fieldguide.lab.memory import check_memory
from fieldguide.lab.tasks import instruction_task
from fieldguide.lab.training import causal_lm_loss, seed_everything
from fieldguide.parameter_efficient.lora import PRESETS as LORA_PRESETS
from fieldguide.parameter_efficient.lora import add_lora, lora_state_dict

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Rank:
    """Where this process stands: its rank among ``world_size`` processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def join_process_group(device: str) -> Rank:
    """Join the group that ``torchrun`` (or ``accelerate launch``) started, if there is one:
    the launcher sets ``RANK``, ``WORLD_SIZE`` and where to meet (``MASTER_ADDR``, ``MASTER_PORT``).
    NCCL between GPUs, one per process; gloo between CPU processes."""
    if "WORLD_SIZE" not in os.environ:  # launched alone: a group of one
        return Rank(0, 1, torch.device(device))
    if device == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return Rank(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return Rank(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))


def global_batches(examples: list, global_batch: int, steps: int, seed: int) -> list[list]:
    """The examples of every step, the same on every rank: the seed alone decides them. The
    examples are reshuffled at each pass over them, so a run may take more than one pass."""
    rng, order = random.Random(seed), []
    while len(order) < global_batch * steps:
        order += rng.sample(range(len(examples)), len(examples))
    return [[examples[i] for i in order[s * global_batch : (s + 1) * global_batch]] for s in range(steps)]


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over every rank (itself, alone)."""
    if dist.is_initialized():
        dist.all_reduce(value)  # in place, summed: every rank ends with the total
    return value


def wrap(model: torch.nn.Module, strategy: str, rank: Rank) -> torch.nn.Module:
    """DDP: the whole model on this rank's device, a replica that averages gradients in the
    backward pass. FSDP: each decoder layer, then the rest, sharded over the ranks (every
    parameter a DTensor split on dim 0), each shard moved to the device as it is made, so no
    device ever holds the whole model. Every rank must start from the same weights: DDP
    copies rank 0's to the others, FSDP copies nothing."""
    if strategy == "ddp" or rank.world_size == 1:
        model = model.to(rank.device)
        check_memory(model)  # every rank holds the whole model
        if rank.world_size == 1:
            return model
        device_ids = [rank.device.index] if rank.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rank.device.type, (rank.world_size,))  # the ranks, on this device type
    for layer in model.model.layers:  # one unit per layer: its weights are gathered only for it
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def zero_bytes_per_device(parameters: float, devices: int, stage: int, optimizer_bytes: int = 12) -> float:
    """Bytes of model state on each device, training with mixed-precision Adam under ZeRO
    stage 0 to 3 (Rajbhandari et al. 2020): per parameter, 2 bytes of 16-bit weights, 2 of
    16-bit gradients and K = 12 of optimizer state (32-bit weights, momentum and variance).
    Stage 1 shards the optimizer state over the devices, stage 2 the gradients too, stage 3
    (FSDP's full sharding) the weights too. Activations and buffers come on top."""
    weights, gradients, states = 2 * parameters, 2 * parameters, optimizer_bytes * parameters
    if stage >= 1:
        states /= devices
    if stage >= 2:
        gradients /= devices
    if stage >= 3:
        weights /= devices
    return weights + gradients + states


def train_step(
    model,
    optimizer,
    examples: list[dict],
    pad_token_id: int,
    rank: Rank,
    normalise: str = "global",
    gradients: dict | None = None,
) -> float:
    """One optimizer step on this rank's share of a global batch; returns the global mean loss.

    The gradient must be that of the loss summed over *all* the step's targets, divided by
    their count. Responses differ in length, so each rank has its own count: each divides by
    the global count, and DDP's and FSDP's averaging over the ranks is undone by the world
    size. (``normalise="local"``, each rank dividing by its own count, is the mistake the page
    measures.) ``gradients``, if given, receives the averaged gradients before the step.
    """
    share = examples[rank.rank :: rank.world_size]  # rank r takes examples r, r + W, r + 2W, ...
    batch = {key: value.to(rank.device) for key, value in pad_batch(share, pad_token_id).items()}
    loss_sum, targets = causal_lm_loss(model, batch)
    total = sum_over_ranks(torch.tensor(float(targets), device=rank.device))
    divisor = total / rank.world_size if normalise == "global" else targets
    (loss_sum / divisor).backward()
    if gradients is not None:
        gradients.update(full_gradients(model))
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)  # as the lab
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(sum_over_ranks(loss_sum.detach()) / total)


def local_parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of the parameters this rank holds, and of the whole model's: under FSDP a
    parameter is a DTensor, of which this rank holds ``to_local()``."""
    local = whole = 0
    for p in model.parameters():
        held = p.to_local() if hasattr(p, "to_local") else p
        local += held.numel() * held.element_size()
        whole += p.numel() * p.element_size()
    return local, whole


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights' gradients, whole (an FSDP shard is gathered: a collective call)."""
    inner = model.module if hasattr(model, "module") else model  # DDP wraps; FSDP2 does not
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu().clone()
        for name, p in inner.named_parameters()
        if p.requires_grad
    }


def trained_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights, whole: an FSDP shard is gathered from every rank (a collective call)."""
    adapter = lora_state_dict(model.module if hasattr(model, "module") else model)
    return {
        name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()
        for name, t in adapter.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("LoRA on several processes with DDP or FSDP; run alone, the reference.")
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="how the ranks share the work")
    parser.add_argument("--steps", type=positive_int, default=4, help="optimizer steps")
    parser.add_argument("--global-batch", type=positive_int, default=8, help="examples per step, all ranks")
    parser.add_argument(
        "--learning-rate",
        type=positive_float,
        help="AdamW's rate (default: 1e-3 on the tiny model; on a real one the LoRA page's 2e-4)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="a .safetensors file for the trained LoRA weights, which rank 0 writes (default: not saved)",
    )
    parser.add_argument(
        "--normalise",
        choices=("global", "local"),
        default="global",
        help="divide each rank's loss by the global target count, or (the mistake) by its own",
    )
    parser.add_argument(
        "--first-gradient",
        type=Path,
        metavar="FILE",
        help="a .safetensors file for the first step's averaged gradients (default: not saved)",
    )
    args = parser.parse_args(argv)
    require_device(parser, args.device)
    for option, path in (("--output", args.output), ("--first-gradient", args.first_gradient)):
        if path is not None and not path.parent.is_dir():
            parser.error(f"argument {option}: the folder {path.parent} does not exist")
    rank = join_process_group(args.device)
    if args.global_batch % rank.world_size:
        parser.error(
            f"argument --global-batch: {args.global_batch} does not split over {rank.world_size} ranks"
        )
    seed_everything(args.seed)  # the same LoRA initialisation on every rank
    model, tokenizer = load_model(args.model)
    model = wrap(add_lora(model, r=8, lora_alpha=16).train(), args.strategy, rank)
    rate = args.learning_rate or (1e-3 if args.model == TINY else LORA_PRESETS.real.learning_rate)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=rate, weight_decay=0.0)  # the lab's AdamW
    local, whole = local_parameter_bytes(model)
    print(f"rank {rank.rank} of {rank.world_size}: holds {local:,} of the model's {whole:,} parameter bytes")
    examples = encode_instructions(tokenizer, instruction_task().train)
    for step, batch in enumerate(global_batches(examples, args.global_batch, args.steps, args.seed)):
        gradients = {} if step == 0 and args.first_gradient else None
        loss = train_step(model, optimizer, batch, tokenizer.pad_token_id, rank, args.normalise, gradients)
        if rank.is_first:
            print(f"step {step + 1}: loss {loss:.4f}")
            if gradients:
                save_file(gradients, args.first_gradient)
    adapter = trained_adapter(model)
    if rank.is_first and args.output:
        save_file(adapter, args.output)
    if dist.is_initialized():
        dist.barrier()  # every rank done before any leaves: none is left waiting on a peer
        dist.destroy_process_group()


if __name__ == "__main__":
    main_guard(main)
