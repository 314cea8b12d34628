"""Next-token probabilities and generation, as a function and as a program."""

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fieldguide.lab import chat, generate
from fieldguide.lab.generate import continue_text, top_next_tokens
from model_families import QWEN2_TEMPLATE, save_family_model


def test_top_next_tokens_are_sorted_probabilities(tiny):
    top = top_next_tokens(*tiny, "the duck lives in the", k=5)
    probabilities = [p for _, p in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1 + 1e-6
    assert top[0][0] == " lake"  # the corpus's fact: each animal has one home


def test_greedy_continuation_is_deterministic(tiny):
    assert continue_text(*tiny, "the fox", max_new_tokens=8) == continue_text(
        *tiny, "the fox", max_new_tokens=8
    )


def test_generate_runs_as_a_program(tiny):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fieldguide.lab.generate",
            "--prompt",
            "the owl lives in the",
            "--max-new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines()[0].endswith("' tree'")


# -- --chat ----------------------------------------------------------------------------------------


@pytest.fixture
def recorded_chat(monkeypatch):
    """chat_reply replaced by a stand-in that answers "reply N" and keeps what it was shown."""
    shown = []

    def reply(model, tokenizer, messages, max_new_tokens, temperature):
        shown.append([dict(m) for m in messages])
        return f" reply {len(shown)}"

    monkeypatch.setattr(generate, "chat_reply", reply)
    return shown


def test_a_chat_answers_each_message_on_its_own_by_default(recorded_chat, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    generate.chat(None, None, None, max_new_tokens=5, temperature=0.0)
    assert capsys.readouterr().out == "reply 1\nreply 2\n"
    assert recorded_chat[1] == [{"role": "user", "content": "second"}]


def test_an_empty_reply_is_said_so(monkeypatch, capsys):
    monkeypatch.setattr(generate, "chat_reply", lambda *args: "")
    generate.chat(None, None, "hello", max_new_tokens=5, temperature=0.0)
    assert capsys.readouterr().out.startswith("(an empty reply")


def test_a_chat_with_history_keeps_the_conversation_until_an_empty_line(recorded_chat, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n\nnever read\n"))
    generate.chat(None, None, None, max_new_tokens=5, temperature=0.0, history=True)
    assert capsys.readouterr().out == "reply 1\nreply 2\n"
    assert recorded_chat[1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": " reply 1"},  # as generated: the template's spacing kept
        {"role": "user", "content": "second"},
    ]


def test_a_chat_ends_at_the_end_of_its_input(recorded_chat, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("only one"))
    generate.chat(None, None, None, max_new_tokens=5, temperature=0.0)
    assert capsys.readouterr().out == "reply 1\n"


def test_a_prompt_is_answered_once_without_reading_stdin(recorded_chat, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # reading it would raise
    generate.chat(None, None, "hello", max_new_tokens=5, temperature=0.0)
    assert capsys.readouterr().out == "reply 1\n" and recorded_chat == [
        [{"role": "user", "content": "hello"}]
    ]


def test_the_chat_answer_is_greedy_and_stops_at_the_end_of_the_turn(tiny):
    """Through the lab's template, whose turns end with EOS; the same answer computed by hand."""
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "repeat: red fox"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    by_hand = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(by_hand[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert generate.chat_reply(model, tokenizer, messages, max_new_tokens=12) == expected


def test_a_model_without_a_chat_template_is_refused_in_one_line(tmp_path, capsys):
    directory = save_family_model("qwen2", tmp_path / "base", chat_template=False)
    capsys.readouterr()  # saving it may have drawn a progress bar
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(directory), "--chat", "--prompt", "hi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"argument --chat: {str(directory)!r} has no chat template; pass --chat-template FILE" in err


def test_a_chat_template_file_lets_a_base_model_chat(tmp_path, monkeypatch):
    directory = save_family_model("qwen2", tmp_path / "base", chat_template=False)
    (tmp_path / "chat.jinja").write_text(QWEN2_TEMPLATE)
    templates = []
    original_reply = generate.chat_reply

    def reply(model, tokenizer, *args):
        templates.append(tokenizer.chat_template)
        return original_reply(model, tokenizer, *args)

    monkeypatch.setattr(generate, "chat_reply", reply)
    argv = ["--model", str(directory), "--chat", "--prompt", "hi", "--max-new-tokens", "3"]
    generate.main([*argv, "--chat-template", str(tmp_path / "chat.jinja")])
    assert templates == [QWEN2_TEMPLATE]  # the file's template, for the one answer


def test_a_chat_template_without_chat_is_refused(tmp_path, capsys):
    (tmp_path / "chat.jinja").write_text(QWEN2_TEMPLATE)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--chat-template", str(tmp_path / "chat.jinja")])
    assert exit_info.value.code == 2
    assert "argument --chat-template: only used with --chat" in capsys.readouterr().err


def test_a_long_conversation_forgets_its_oldest_exchanges_to_fit_the_context(tiny):
    model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    turn = [
        {"role": "user", "content": "repeat: owl apple pie"},
        {"role": "assistant", "content": "owl apple pie"},
    ]
    messages = turn * 12 + [{"role": "user", "content": "last word of: fox red pie"}]
    encoded = generate.fit_in_context(model, tokenizer, messages)
    assert encoded["input_ids"].shape[1] < limit
    assert messages[-1]["content"] == "last word of: fox red pie" and messages[0]["role"] == "user"
    assert len(messages) < 25  # some exchanges were dropped, the newest message kept


def test_a_message_longer_than_the_context_is_one_clear_error(tiny):
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "repeat: " + "owl " * 200}]
    with pytest.raises(ValueError, match="the model's context holds 128"):
        generate.fit_in_context(model, tokenizer, messages)


def test_generation_stops_where_the_model_itself_would_too(monkeypatch):
    monkeypatch.setattr(chat, "end_of_turn_id", lambda tokenizer: 5)
    tokenizer, config = SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=[7, 9])
    assert chat.stop_token_ids(tokenizer, config) == [5, 7, 9]  # no None; the config's list kept
