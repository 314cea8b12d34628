"""Next-token prediction made visible: the most likely next tokens, and text generation.

Run it to continue a prompt with any causal LM, or to chat with a model that has a chat
template (a fine-tune saved with ``--output``, say)::

    fieldguide generate --prompt "the duck lives in the"
    fieldguide generate --model my-first-fine-tune --chat --prompt "repeat: owl apple pie"

(``python -m fieldguide.lab.generate`` is the same command.)
"""

import sys

import torch

from fieldguide.lab.chat import stop_token_ids
from fieldguide.lab.cli import (
    add_chat_template_argument,
    example_parser,
    main_guard,
    non_empty_text,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from fieldguide.lab.loading import parse_and_load

DEFAULT_PROMPT = "the duck lives in the"  # a fact of the tiny model's corpus: the next word is "lake"


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


@torch.no_grad()
def chat_reply(
    model, tokenizer, messages: list[dict], max_new_tokens: int = 200, temperature: float = 0.0
) -> str:
    """The assistant's next turn in ``messages``, rendered with the model's chat template.

    The template writes the conversation and the cue for the assistant to start
    (``add_generation_prompt``); generation stops at the token that ends a turn, read off the
    template (``fieldguide.lab.chat``), so the reply is one turn, not the model's next guess
    at what the user says.
    """
    encoded = fit_in_context(model, tokenizer, messages)
    prompt_length = encoded["input_ids"].shape[1]
    # No further than the model's context (the tiny model's is 128 tokens): past it, a model
    # that has not stopped produces nothing worth reading.
    room = getattr(model.config, "max_position_embeddings", None) or prompt_length + max_new_tokens
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        **encoded,
        max_new_tokens=max(1, min(max_new_tokens, room - prompt_length)),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer, model.generation_config),
        **sampling,
    )
    return tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)


def fit_in_context(model, tokenizer, messages: list[dict]) -> dict:
    """The rendered conversation, its oldest exchanges dropped (from ``messages`` itself) until
    it leaves room for at least one new token in the model's context.

    A long chat outgrows a small context in a few turns (the tiny model's is 128 tokens);
    forgetting the oldest turns is what chat front ends do. A single message that does not fit
    on its own is an error, not a reply cut to nothing.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    while True:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(model.device)
        if limit is None or encoded["input_ids"].shape[1] < limit:
            return encoded
        if len(messages) <= 1:
            raise ValueError(
                f"the message takes {encoded['input_ids'].shape[1]} tokens with the chat template, "
                f"and the model's context holds {limit}: write a shorter one"
            )
        del messages[:2]  # the oldest user message and the reply to it


def user_turns(prompt: str | None):
    """The user's messages: ``prompt`` alone, or lines from stdin until EOF or an empty line."""
    if prompt is not None:
        yield prompt
        return
    if sys.stdin.isatty():
        print("Type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():  # "" at EOF, "\n" for an empty line
            return
        yield line.strip()


def chat(
    model, tokenizer, prompt: str | None, max_new_tokens: int, temperature: float, history: bool = False
) -> None:
    """Answer each user turn: on its own, or with the conversation so far (``history``).

    On its own is the default because the lab's models were fine-tuned on one-message chats:
    shown a longer conversation, they answer worse than when asked afresh.
    """
    messages = []
    for text in user_turns(prompt):
        if not history:
            messages.clear()
        messages.append({"role": "user", "content": text})
        reply = chat_reply(model, tokenizer, messages, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": reply})  # as generated, for the next turn
        print(reply.strip() or "(an empty reply: the model ended its turn at once)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = example_parser("Show a model's next-token probabilities and continue a prompt, or chat with it.")
    parser.add_argument(
        "--prompt",
        type=non_empty_text,
        help=f"text to continue (default: {DEFAULT_PROMPT!r}); with --chat, the one user message to "
        "answer (default: read messages from stdin, one a line, until an empty line)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="answer as the assistant, through the model's chat template, until the end of its turn",
    )
    parser.add_argument(
        "--history",
        action="store_true",
        help="with --chat, show the model the whole conversation, not only the latest message "
        "(the lab's models were fine-tuned on one-message chats; real chat models want it)",
    )
    add_chat_template_argument(parser)
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="tokens to generate (default: 20; with --chat, at most 200 per answer)",
    )
    parser.add_argument(
        "--top-k", type=non_negative_int, default=5, help="next tokens to list, without --chat"
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="0 picks the likeliest token; higher samples",
    )
    args, model, tokenizer = parse_and_load(parser, argv, training=False)
    if args.chat_template is not None and not args.chat:
        parser.error("argument --chat-template: only used with --chat")
    if args.chat:
        if args.chat_template is not None:
            tokenizer.chat_template = args.chat_template.read_text()
        if not tokenizer.chat_template:
            parser.error(
                f"argument --chat: {args.model!r} has no chat template; pass --chat-template FILE "
                "(a Jinja template), or drop --chat to continue text"
            )
        chat(model, tokenizer, args.prompt, args.max_new_tokens or 200, args.temperature, args.history)
        return
    prompt = args.prompt or DEFAULT_PROMPT
    for token, prob in top_next_tokens(model, tokenizer, prompt, args.top_k):
        print(f"{prob:6.1%}  {token!r}")
    print(prompt + continue_text(model, tokenizer, prompt, args.max_new_tokens or 20, args.temperature))


if __name__ == "__main__":
    main_guard(main)
