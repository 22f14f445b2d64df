import json
import math

import pytest
import torch

from sli.evaluation import compare_logits, format_report, load_eval_text, perplexity


def test_uniform_logits_perplexity_is_vocab_size():
    vocab = 37
    ids = torch.randint(0, vocab, (100,))
    ppl = perplexity(lambda x: torch.zeros(1, x.shape[1], vocab), ids, window=16, num_windows=4)
    assert ppl == pytest.approx(vocab, rel=1e-6)


def test_known_perplexities():
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])

    def oracle(x, p_target):
        # Puts probability p_target on the true next token, the rest spread evenly over 9 others.
        logits = torch.full((1, x.shape[1], 10), math.log((1 - p_target) / 9))
        for i in range(x.shape[1] - 1):
            logits[0, i, x[0, i + 1]] = math.log(p_target)
        return logits

    assert perplexity(lambda x: oracle(x, 0.5), ids, window=5, num_windows=2) == pytest.approx(2.0, rel=1e-5)
    assert perplexity(lambda x: oracle(x, 1 - 1e-6), ids, window=10, num_windows=1) == pytest.approx(1.0, abs=1e-4)


def test_perplexity_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(lambda x: torch.zeros(1, x.shape[1], 5), [1], window=4)
    with pytest.raises(ValueError, match="window"):
        perplexity(lambda x: torch.zeros(1, x.shape[1], 5), [1, 2, 3], window=1)
    with pytest.raises(ValueError, match=r"\[1, S, V\]"):
        perplexity(lambda x: torch.zeros(x.shape[1], 5), [1, 2, 3, 4], window=4)
    with pytest.raises(ValueError, match="one sequence"):
        perplexity(lambda x: torch.zeros(1, x.shape[1], 5), torch.zeros(2, 4, dtype=torch.long), window=4)


def test_perplexity_uses_first_windows_only():
    seen = []

    def fn(x):
        seen.append(x.shape[1])
        return torch.zeros(1, x.shape[1], 5)

    perplexity(fn, list(range(5)) * 20, window=8, num_windows=3)
    assert seen == [8, 8, 8]


def test_identical_logits_kl_zero_top1_one():
    logits = torch.randn(1, 12, 50)
    r = compare_logits(logits, logits.clone())
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["top1_agreement"] == 1.0


def test_different_logits():
    a = torch.randn(20, 30)
    r = compare_logits(a, -a)
    assert r["kl"] > 0.1 and r["top1_agreement"] < 0.5
    # Shifting every logit of a token by a constant changes no probability.
    assert compare_logits(a, a + 7.0)["kl"] == pytest.approx(0.0, abs=1e-5)


def test_kl_known_value_and_direction():
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(ref || q), not KL(q || ref)
    r = compare_logits(ref, q)
    assert r["kl"] == pytest.approx(expected, rel=1e-5)
    assert r["top1_agreement"] == 1.0  # ties break to the first index in both
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(ref, torch.zeros(1, 3))


def test_decoder_layers_skips_expert_lists(model_factory):
    from transformers import AutoModelForCausalLM

    from sli.evaluation import _decoder_layers

    model = AutoModelForCausalLM.from_pretrained(model_factory("mixtral"))
    path, layers = _decoder_layers(model)
    assert path == "model.layers" and layers is model.model.layers


def test_default_text_and_report():
    text = load_eval_text()
    assert len(text) > 100_000 and "\n" in text
    report = {"model_dir": "m", "text": "t", "tokens": 10, "num_windows": 1, "window": 10,
              "modes": {"none": {"perplexity": 2.0, "perplexity_change_pct": 0.0, "kl": 0.0, "top1_agreement": 1.0,
                                 "weight_snr_db": None, "linear_bytes": 1e6, "forward_latency_s": 0.1},
                        "int8": {"perplexity": 2.1, "perplexity_change_pct": 5.0, "kl": 0.01, "top1_agreement": 0.9,
                                 "weight_snr_db": 40.0, "linear_bytes": 5e5, "forward_latency_s": 0.1}}}
    table = format_report(report)
    assert "| int8 |" in table and "+5.00%" in table


def test_evaluate_modes_on_tiny_model(model_factory, tmp_path):
    from sli.evaluation import evaluate_modes
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = model_factory("llama", "tiny")
    vocab = {chr(33 + i): i for i in range(200)}
    vocab["[UNK]"] = 200
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    out = tmp_path / "model"
    import shutil
    shutil.copytree(path, out)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    report = evaluate_modes(out, ["none", "int8", "nf4", "mixed"], num_windows=2, window=32, progress=False)
    modes = report["modes"]
    assert modes["none"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert modes["none"]["top1_agreement"] == 1.0
    assert modes["int8"]["weight_snr_db"] > modes["nf4"]["weight_snr_db"] > 10
    assert modes["nf4"]["linear_bytes"] < modes["int8"]["linear_bytes"] < modes["none"]["linear_bytes"]
    assert all(math.isfinite(m["perplexity"]) for m in modes.values())
    # Bytes are counted against the checkpoint's bf16 weights, not the fp32 copy used to compute.
    assert report["checkpoint_dtype"] == "bfloat16"
    config = json.loads((out / "config.json").read_text())
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    linear_params = n * (2 * h * h + 2 * h * kv + 3 * h * i)
    assert modes["none"]["linear_bytes"] == modes["none"]["checkpoint_linear_bytes"] == 2 * linear_params
    assert "| mixed |" in format_report(report)
