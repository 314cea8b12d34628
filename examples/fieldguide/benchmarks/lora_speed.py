"""How long a LoRA training step takes beside full fine-tuning's, measured side by side.

LoRA skips the weight gradients of every frozen layer and their optimizer updates, so in
arithmetic a step costs about two thirds of full fine-tuning's; what a step really costs also
depends on everything else it does. This benchmark times one training step of full
fine-tuning, PEFT's LoRA and ours, its forward pass, backward pass and AdamW update each timed
apart, the models in turn, round after round, on one batch and a randomly initialised Llama of
about 34M parameters, and prints each step time and its ratio to full fine-tuning's.
``nox -s benchmark`` runs it; ``--profile`` adds where our LoRA's step spends its time::

    python -m fieldguide.benchmarks.lora_speed --profile
"""

import copy
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fieldguide.lab.cli import ExampleParser, main_guard, positive_int
from fieldguide.parameter_efficient.lora import add_lora

# A Llama of 33.7M parameters: 8 blocks of width 512 (25.3M) and untied input and output
# embeddings over 8,192 tokens (8.4M). Step times depend on the shapes, not on the values, so
# the weights are random and nothing has to be trained or downloaded first.
BENCHMARK_SHAPE = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1376,
    "tie_word_embeddings": False,
}


def benchmark_model(shape: dict = BENCHMARK_SHAPE, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{"max_position_embeddings": 2048, **shape}))


def benchmark_batch(vocab_size: int, batch_size: int, length: int, seed: int = 0) -> dict:
    """Random tokens, every one a target: ``batch_size`` rows of ``length``, no padding."""
    ids = torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def contenders(base: torch.nn.Module, r: int) -> dict[str, torch.nn.Module]:
    """Full fine-tuning, PEFT's LoRA and ours, each on its own copy of ``base``, in training mode."""
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    return {
        "full fine-tuning": copy.deepcopy(base).requires_grad_(True).train(),
        "PEFT's LoRA": get_peft_model(copy.deepcopy(base), config).train(),
        "our LoRA": add_lora(copy.deepcopy(base), "all-linear", r=r, lora_alpha=2 * r).train(),
    }


def phase_seconds(
    models: dict[str, torch.nn.Module], batch: dict, rounds: int = 5
) -> dict[str, dict[str, float]]:
    """Each model's fastest forward pass, backward pass and optimizer step, taken in turn.

    Split like this, a step shows where LoRA saves: the backward pass computes no gradient for
    a frozen weight, and the optimizer updates only the adapters; the forward pass saves nothing.
    """
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        for name, model in models.items()
    }
    times = {name: {"forward": [], "backward": [], "optimizer": []} for name in models}
    for _ in range(rounds + 1):  # the first round only warms up
        for name, model in models.items():
            start = time.perf_counter()
            loss = model(**batch).loss
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            optimizers[name].step()
            optimizers[name].zero_grad()
            end = time.perf_counter()
            for phase, seconds in [
                ("forward", forward - start),
                ("backward", backward - forward),
                ("optimizer", end - backward),
            ]:
                times[name][phase].append(seconds)
    return {
        name: {phase: min(values[1:]) for phase, values in phases.items()} for name, phases in times.items()
    }


def profile_step(model: torch.nn.Module, batch: dict, rows: int = 12) -> str:
    """The operators that take the most time in one training step of ``model``, as a table."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    for _ in range(2):  # the first steps allocate the optimizer's state; profile a later one
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.profiler.profile() as profiler:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    parser = ExampleParser(description="Time a LoRA training step beside full fine-tuning's, side by side.")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    parser.add_argument("--length", type=positive_int, default=128, help="tokens per sequence")
    parser.add_argument("--lora-r", type=positive_int, default=8, help="LoRA's rank, on every linear layer")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed steps per contender")
    parser.add_argument("--profile", action="store_true", help="also profile one step of our LoRA")
    args = parser.parse_args(argv)
    base = benchmark_model()
    print(
        f"Llama of {sum(p.numel() for p in base.parameters()):,} parameters, batch {args.batch_size} x {args.length} tokens, r = {args.lora_r} on every linear layer, {torch.get_num_threads()} threads"
    )
    models = contenders(base, args.lora_r)
    batch = benchmark_batch(BENCHMARK_SHAPE["vocab_size"], args.batch_size, args.length)
    # One measurement, split by phase; the step's share is the sum of its phases, as on the page.
    phases = phase_seconds(models, batch, args.rounds)
    full = sum(phases["full fine-tuning"].values())
    for name, timings in phases.items():
        step = sum(timings.values())
        split = ", ".join(f"{phase} {1000 * value:6.1f}" for phase, value in timings.items())
        print(f"{name:17s} {1000 * step:7.1f} ms per step ({split}), {step / full:.2f} of full fine-tuning's")
    if args.profile:
        print(profile_step(models["our LoRA"], batch))


if __name__ == "__main__":
    main_guard(main)
