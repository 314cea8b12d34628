"""``fieldguide``: list the guide's runnable examples, or run one.

``fieldguide`` (or ``python -m fieldguide``) prints one line per example;
``fieldguide <example> [options]`` runs it, and ``fieldguide <example> --help`` shows its
options with their defaults. Each example is also a module, runnable as
``python -m fieldguide.<part>.<page>``.
"""

import importlib
import sys

from fieldguide import __version__

# Every runnable example, in the order of the site: command name, module, what it does.
# The command name is the page's name, so the site and the command line agree.
COMMANDS = {
    "generate": (
        "fieldguide.lab.generate",
        "continue a prompt, showing the next-token probabilities; or chat (--chat)",
    ),
    "what-are-llms": ("fieldguide.foundations.what_are_llms", "pretrain the lab's tiny base model"),
    "common-llms": ("fieldguide.foundations.common_llms", "count a Llama-family model's parameters"),
    "choosing": ("fieldguide.foundations.choosing", "zero-shot, few-shot and retrieval prompts, no training"),
    "tutorial": ("fieldguide.start_here.tutorial", "your first fine-tune: instruction following"),
    "full-fine-tuning": (
        "fieldguide.whole_model.full_fine_tuning",
        "train every weight on the sentiment task",
    ),
    "instruction-tuning": ("fieldguide.whole_model.instruction_tuning", "supervised fine-tuning on chats"),
    "continued-pretraining": (
        "fieldguide.whole_model.continued_pretraining",
        "keep pretraining on a new domain, with replay",
    ),
    "distillation": (
        "fieldguide.whole_model.distillation",
        "a small student learns from a fine-tuned teacher",
    ),
    "evaluation": ("fieldguide.whole_model.evaluation", "score a model on the lab's tasks and held-out text"),
    "lora": (
        "fieldguide.parameter_efficient.lora",
        "LoRA from scratch: train a low-rank update of each linear layer",
    ),
    "dora": (
        "fieldguide.parameter_efficient.dora",
        "DoRA from scratch: LoRA plus a trained magnitude for every output",
    ),
    "qlora": (
        "fieldguide.parameter_efficient.qlora",
        "QLoRA from scratch: LoRA over a base frozen in 4-bit NF4",
    ),
    "ia3": (
        "fieldguide.parameter_efficient.ia3",
        "IA3 from scratch: learned vectors that rescale keys, values and activations",
    ),
    "adapters": (
        "fieldguide.parameter_efficient.adapters",
        "bottleneck adapters from scratch: a small network after each sublayer",
    ),
    "prompt-tuning": (
        "fieldguide.parameter_efficient.prompt_tuning",
        "prompt tuning from scratch: a trained soft prompt in front of a frozen model",
    ),
    "p-tuning": (
        "fieldguide.parameter_efficient.p_tuning",
        "P-tuning from scratch: a soft prompt made by a small trained network",
    ),
    "prefix-tuning": (
        "fieldguide.parameter_efficient.prefix_tuning",
        "prefix tuning from scratch: trained keys and values in every attention layer",
    ),
    "bitfit": (
        "fieldguide.parameter_efficient.bitfit",
        "BitFit from scratch: train the bias terms and nothing else",
    ),
    "from-sft-to-alignment": (
        "fieldguide.alignment.from_sft_to_alignment",
        "the SFT policy every alignment page starts from, judged by the lab's rule",
    ),
    "reward-models": ("fieldguide.alignment.reward_models", "train a reward model on preference pairs"),
    "ppo": ("fieldguide.alignment.ppo", "RLHF with PPO against the reward model, with a KL penalty"),
    "dpo": ("fieldguide.alignment.dpo", "align a model to preference pairs with DPO, from scratch"),
    "dpo-successors": (
        "fieldguide.alignment.dpo_successors",
        "IPO, KTO, ORPO or SimPO on the same pairs, from scratch",
    ),
    "grpo": ("fieldguide.alignment.grpo", "GRPO with the lab's rule as a verifiable reward"),
    "multi-device": (
        "fieldguide.costs.multi_device",
        "LoRA on several processes with DDP or FSDP (torchrun); alone, the reference",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"fieldguide {__version__}: the LLM Fine-Tuning Field Guide's examples",
        "",
        "usage: fieldguide <example> [options]     (fieldguide <example> --help for its options)",
        "",
        "examples:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] == "--version":
        print(__version__)
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.exit(f"fieldguide: error: no example named {name!r}; run `fieldguide` to list them")
    module = importlib.import_module(COMMANDS[name][0])
    from fieldguide.lab.cli import main_guard  # imports PyTorch: only once an example is run

    sys.argv[0] = f"fieldguide {name}"  # argparse names the program after it in usage and errors
    main_guard(lambda: module.main(rest))


if __name__ == "__main__":
    main()
