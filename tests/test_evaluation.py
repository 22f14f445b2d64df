import math

import pytest
import torch

from sli.evaluation import compare_logits, format_report, load_eval_text, perplexity


def test_uniform_logits_perplexity_is_vocab_size():
    vocab = 37
    ids = torch.randint(0, vocab, (100,))
    ppl = perplexity(lambda x: torch.zeros(1, x.shape[1], vocab), ids, window=16, num_windows=4)
    assert ppl == pytest.approx(vocab, rel=1e-5)


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
    assert "| mixed |" in format_report(report)
