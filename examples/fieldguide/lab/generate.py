"""Next-token prediction made visible: the most likely next tokens, and text generation.

Run it to continue a prompt with any causal LM::

    python -m fieldguide.lab.generate --prompt "the duck lives in the"
"""

import torch

from fieldguide.lab.cli import (
    example_parser,
    main_guard,
    non_empty_text,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from fieldguide.lab.loading import parse_and_load


@torch.no_grad()
def top_next_tokens(model, tokenizer, text: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most probable next tokens after ``text``, with their probabilities."""
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)  # (1, T)
    logits = model(input_ids=input_ids).logits[0, -1]  # (V,): the scores for position T+1
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(k)
    return [(tokenizer.decode(int(i)), float(p)) for p, i in zip(top.values, top.indices, strict=True)]


@torch.no_grad()
def continue_text(model, tokenizer, text: str, max_new_tokens: int = 20, temperature: float = 0.0) -> str:
    """Continue ``text`` one token at a time: greedy at temperature 0, sampled above it."""
    encoded = tokenizer(text, return_tensors="pt").to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        **encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
    )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Show a model's next-token probabilities and continue a prompt.")
    parser.add_argument(
        "--prompt", type=non_empty_text, default="the duck lives in the", help="text to continue"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=20, help="tokens to generate (default: 20)"
    )
    parser.add_argument("--top-k", type=non_negative_int, default=5, help="next tokens to list (default: 5)")
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="0 (default) picks the likeliest token; higher samples",
    )
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    for token, prob in top_next_tokens(model, tokenizer, args.prompt, args.top_k):
        print(f"{prob:6.1%}  {token!r}")
    print(args.prompt + continue_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature))


if __name__ == "__main__":
    main_guard(main)
