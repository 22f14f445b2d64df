"""Conversations: turns that reuse the KV cache, and the terminal chat as a person sees it."""
import io
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from sli import UniversalSLIProcessor
from sli.chat import Conversation, run_chat


@pytest.fixture(scope="module")
def smollm2_processor(tmp_path_factory):
    from sli.default_model import ensure_default_model

    proc = UniversalSLIProcessor(ensure_default_model(progress=False), "int8", device="cpu",
                                 cache_dir=tmp_path_factory.mktemp("chat-cache"))
    yield proc
    proc.close()


def test_two_turns_answer_and_the_second_feeds_only_its_own_tokens(smollm2_processor):
    proc = smollm2_processor
    chat = Conversation(proc, max_new_tokens=24)
    assert "Paris" in chat.ask("What is the capital of France?")
    fed = []
    real_step = proc._step
    proc._step = lambda ids, *rest: fed.append(ids.shape[1]) or real_step(ids, *rest)
    try:
        second = chat.ask("And of Italy? Answer with the city only.")
    finally:
        proc._step = real_step
    assert "Rome" in second
    message_tokens = len(proc.tokenizer()("And of Italy? Answer with the city only.")["input_ids"])
    assert fed[0] < message_tokens + 12  # the new message and its template tokens, not the history
    assert chat.session.length + len(chat.session.pending) == len(chat.session.token_ids)


def test_a_stopped_answer_keeps_the_conversation_going(smollm2_processor):
    chat = Conversation(smollm2_processor, max_new_tokens=40)
    pieces = []
    partial = chat.ask("Write a long story about a cat.", on_text=pieces.append, should_stop=lambda: len(pieces) >= 3)
    assert 1 <= len(partial.split()) and len(pieces) == 3
    assert "Paris" in chat.ask("What is the capital of France?")


def test_the_loop_answers_then_quits_on_exit(smollm2_processor):
    lines = iter(["What is the capital of France?", "/exit"])
    out = io.StringIO()
    assert run_chat(Conversation(smollm2_processor, max_new_tokens=16), read=lambda prompt: next(lines), out=out) == 0
    assert "Paris" in out.getvalue()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux drives the terminal test")  # tmux is a test tool here
def test_sli_chat_in_a_real_terminal(tmp_path):
    session = f"sli-chat-{os.getpid()}"
    sli = os.path.join(os.path.dirname(sys.executable), "sli")
    command = f"{sli} chat --mode int8 --cache-dir {tmp_path} --max-new-tokens 24"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", command], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(text: str, seconds: float = 240) -> str:
        deadline = time.time() + seconds
        while time.time() < deadline:
            shown = screen()
            if text in shown:
                return shown
            time.sleep(0.5)
        raise AssertionError(f"{text!r} never appeared; the screen shows:\n{screen()}")

    try:
        wait_for(">>>")  # (capture-pane drops the prompt's trailing space)
        subprocess.run(["tmux", "send-keys", "-t", session, "What is the capital of France?", "Enter"], check=True)
        wait_for("Paris")
        deadline = time.time() + 120
        while screen().count(">>>") < 2 and time.time() < deadline:  # the answer ended: a new prompt
            time.sleep(0.5)
        assert screen().count(">>>") == 2
        subprocess.run(["tmux", "send-keys", "-t", session, "C-d"], check=True)
        deadline = time.time() + 30
        while time.time() < deadline and subprocess.run(["tmux", "has-session", "-t", session]).returncode == 0:
            time.sleep(0.5)
        assert subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
