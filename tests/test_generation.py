"""Sampling and stopping (sli.generation, sli.stopping): the repetition penalty and min-p against
transformers' own logits processors, the decode loop's penalty bookkeeping, and stop strings
that cut the answer exactly and never show part of themselves."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper)

from sli.generation import (apply_frequency_presence_penalty, apply_min_p, apply_repetition_penalty,
                            check_sampling, generate_tokens, logits_to_probs, seen_tokens)
from sli.stopping import StopStrings, end_token_ids


# ---------------------------------------------------------------- against transformers


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.1, 1.3, 2.0, 10.0])
def test_repetition_penalty_equals_transformers(penalty):
    generator = torch.Generator().manual_seed(int(penalty * 10))
    for vocab, batch, length in ((50, 3, 12), (1000, 2, 300), (7, 4, 1)):
        logits = torch.randn(batch, vocab, generator=generator) * 5
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        before = logits.clone()
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        got = apply_repetition_penalty(logits, seen_tokens(ids, vocab), penalty)
        assert torch.equal(got, expected) and torch.equal(logits, before)  # (not changed in place)


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.05, 0.1, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_min_p_after_temperature_equals_transformers(min_p, temperature):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 300, generator=generator) * 3
    logits[1, :5] = logits[1].max() + 1  # a tie at the top: both stay
    ids = torch.zeros(4, 1, dtype=torch.long)
    tempered = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    expected = MinPLogitsWarper(min_p)(ids, tempered.clone()) if min_p > 0 else tempered  # (transformers: 0 = off)
    assert torch.equal(apply_min_p(logits / temperature, min_p), expected)
    # the sampling distribution: softmax of transformers' processed logits (top-k, then min-p, as it orders them)
    topk = TopKLogitsWarper(50)(ids, tempered.clone())
    processed = MinPLogitsWarper(min_p)(ids, topk) if min_p > 0 else topk
    assert torch.equal(logits_to_probs(logits, temperature, top_k=50, min_p=min_p), torch.softmax(processed, -1))


def test_min_p_keeps_the_most_likely_token_and_drops_the_unlikely():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_min_p(logits, 0.2)  # threshold 0.1: the 0.05 goes
    assert torch.isinf(kept[0, 3]) and torch.isfinite(kept[0, :3]).all()
    assert torch.isfinite(apply_min_p(logits, 1.0)).tolist() == [[True, False, False, False]]
    assert apply_min_p(logits, None) is logits and apply_min_p(logits, 0) is logits


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[0, 3, 1, 0]])
    got = apply_frequency_presence_penalty(logits, counts, frequency=0.5, presence=0.25)
    assert got.tolist() == [[1.0, 2.0 - 1.5 - 0.25, -1.0 - 0.5 - 0.25, 0.5]]


def test_seen_tokens_skips_padding_and_ids_past_the_vocabulary():
    ids = torch.tensor([[0, 0, 3], [9, 1, 2]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    assert seen_tokens(ids, 5, mask).tolist() == [[False, False, False, True, False],
                                                  [False, True, True, False, False]]


# ---------------------------------------------------------------- the decode loop


class FixedStep:
    """A model step that always answers the same logits and counts its calls."""

    def __init__(self, logits):
        self.logits, self.calls = torch.as_tensor(logits, dtype=torch.float32), 0

    def __call__(self, ids, mask, positions, kv):
        self.calls += 1
        return self.logits.expand(ids.shape[0], -1), kv


def test_greedy_decoding_penalizes_the_prompt_without_its_padding_then_each_new_token():
    step = FixedStep([[2.0, 1.9, -1.0, -1.0, -1.0]])
    ids, mask = torch.tensor([[0, 3]]), torch.tensor([[0, 1]])  # token 0 is padding: not penalized
    out = generate_tokens(step, ids, mask, None, 3, repetition_penalty=2.0)
    # step 1: 0 wins (2.0 > 1.9); step 2: 0 is seen (1.0 < 1.9); step 3: both seen (1.0 > 0.95)
    assert out.tolist() == [[0, 1, 0]]
    assert generate_tokens(step, ids, torch.ones(1, 2, dtype=torch.long), None, 1,
                           repetition_penalty=2.0).tolist() == [[1]]  # unpadded, token 0 is the prompt's
    # tokens already in the cache (a session's earlier turns) count too
    assert generate_tokens(step, torch.tensor([[3]]), torch.ones(1, 2, dtype=torch.long), None, 1,
                           repetition_penalty=2.0, history=torch.tensor([[0]])).tolist() == [[1]]
    assert generate_tokens(step, ids, mask, None, 3).tolist() == [[0, 0, 0]]  # 1.0: off


def test_should_stop_ends_the_loop_after_the_token_in_hand():
    step = FixedStep([[0.0, 1.0, 0.0]])
    out = generate_tokens(step, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.long), None, 50,
                          callback=lambda token: None, should_stop=lambda: step.calls >= 3)
    assert out.shape == (1, 3) and step.calls == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"min_p": 1.5}, "min_p=1.5 must be in [0, 1]"),
    ({"min_p": -0.1}, "min_p=-0.1 must be in [0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be > 0"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty=nan must be a finite number"),
    ({"top_p": 0}, "top_p=0 must be in (0, 1]"),
    ({"temperature": -1}, "temperature=-1 must be >= 0"),
])
def test_out_of_range_sampling_is_one_line_naming_the_range(kwargs, message):
    with pytest.raises(ValueError) as caught:
        check_sampling(**kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError):
        generate_tokens(FixedStep([[0.0, 1.0]]), torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.long), None, 2,
                        **kwargs)


# ---------------------------------------------------------------- stop strings


def stream(stops, pieces):
    """Feed ``pieces`` (one per token) through StopStrings as a decode loop does; returns it, the
    text shown after each piece, and what the loop showed in all (flushed if it did not stop)."""
    answer, text, shown, seen = StopStrings(stops), "", "", []
    for piece in pieces:
        text += piece
        shown += answer.update(text)
        seen.append(shown)
        if answer.stopped:
            break
    else:
        shown += answer.flush()
    return answer, seen, shown


def test_a_stop_string_cuts_the_text_before_it_and_nothing_of_it_shows():
    answer, seen, shown = stream(["</end>"], list("Hello </e") + ["n", "d> tail"])
    assert answer.stopped and answer.matched == "</end>" and answer.text == shown == "Hello "
    assert len(seen) == 11  # the loop ended at the token that completed it, not at the end of the pieces
    assert all(shown.startswith(s) for s in seen)  # append-only: no partial stop string was shown and taken back


def test_a_stop_string_start_is_held_until_known_not_to_be_one():
    answer, seen, shown = stream(["world", "\n\n"], list("Hello wor\nword!\n"))
    assert not answer.stopped and shown == answer.text == "Hello wor\nword!\n"
    assert seen[8] == "Hello " and seen[9] == "Hello wor"  # "wor" waits; "\n" releases it and waits itself
    assert seen[10] == "Hello wor\n" and seen[13] == "Hello wor\nword"
    assert seen[-1] == "Hello wor\nword!"  # the last "\n" is held, then flushed when the answer ends


def test_the_earliest_stop_string_wins_and_a_stop_inside_one_token_cuts_it():
    answer, _, shown = stream(["cd", "b"], ["xabcd"])
    assert (answer.text, answer.matched, shown) == ("xa", "b", "xa")
    answer, _, shown = stream(["aab"], list("aaab"))  # overlapping starts: "aa" then "aab" at 1
    assert (answer.text, shown) == ("a", "a")


def test_incomplete_characters_wait_without_stop_strings():
    answer = StopStrings()
    assert answer.update("caf\ufffd") == "caf" and answer.update("café") == "é"
    assert not answer and StopStrings("x").stops == ["x"] and StopStrings(["", "x", "x"]).stops == ["x"]
    with pytest.raises(TypeError):
        StopStrings([1])


def test_end_token_ids_read_generation_config(tmp_path):
    import json
    from types import SimpleNamespace

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert end_token_ids(tmp_path, SimpleNamespace(eos_token_id=2), SimpleNamespace(eos_token_id=7)) == [2, 5, 7]
    (tmp_path / "generation_config.json").write_text("[1, 2]")  # not an object: ignored
    assert end_token_ids(tmp_path, SimpleNamespace(eos_token_id=2), None) == [2]


# ---------------------------------------------------------------- through the processor


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from sli.synth import synth_model

    return synth_model(tmp_path_factory.mktemp("llama"), family="llama", preset="tiny")


def test_processor_repetition_penalty_equals_transformers_generate(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from sli.processor import UniversalSLIProcessor

    reference = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    with UniversalSLIProcessor(llama, "none", cache_dir=tmp_path / "cache", memory_budget_gb=0.0) as proc:
        plain = proc.generate(ids, max_new_tokens=16, eos_token_id=[])
        got = proc.generate(ids, max_new_tokens=16, eos_token_id=[], repetition_penalty=1.8)
        # (the prompt holds token 0, the pad_token_id given: without a mask transformers would mask it out)
        want = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)[:, 10:]
        assert got.tolist() == want.tolist() and got.tolist() != plain.tolist()
        # min_p=1 keeps only the most likely token: sampling it is the greedy answer
        assert proc.generate(ids, max_new_tokens=16, eos_token_id=[], do_sample=True, min_p=1.0,
                             seed=5).tolist() == plain.tolist()
        # a session's second turn counts the first turn's tokens, as one call over the whole text does
        session = proc.new_session()
        first = proc.generate(ids, max_new_tokens=6, eos_token_id=[], session=session, repetition_penalty=1.8)
        more = torch.tensor([[5, 6, 7]])
        second = proc.generate(more, max_new_tokens=6, eos_token_id=[], session=session, repetition_penalty=1.8)
        whole = proc.generate(torch.cat([ids, first, more], dim=1), max_new_tokens=6, eos_token_id=[],
                              repetition_penalty=1.8)
        assert second.tolist() == whole.tolist()


def test_a_chat_answer_ends_before_a_stop_string_and_the_conversation_goes_on(tmp_path):
    from sli.chat import Conversation
    from sli.default_model import ensure_default_model
    from sli.processor import UniversalSLIProcessor

    with UniversalSLIProcessor(ensure_default_model(progress=False), "int8", device="cpu",
                               cache_dir=tmp_path / "cache") as proc:
        question = "What is the capital of France?"
        whole = Conversation(proc, max_new_tokens=24).ask(question)
        assert "Paris" in whole
        pieces = []
        chat = Conversation(proc, max_new_tokens=24, stop=["Paris"])
        cut = chat.ask(question, on_text=pieces.append)
        assert cut == "".join(pieces) == whole[:whole.index("Paris")]
        assert chat.messages[-1] == {"role": "assistant", "content": cut}
        second = chat.ask("And of Italy?")  # the cache rewinds past the tokens the cut dropped
        assert second and "Paris" not in second and len(chat.messages) == 4
        session = chat.session
        assert session.length + len(session.pending) == len(session.token_ids)
