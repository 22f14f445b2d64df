"""One contender of the streaming benchmark, run in a fresh process.

    python benchmarks/peers.py --contender full|accelerate|airllm|airllm-4bit|sli \
        --model-dir DIR --out result.json [--mode none|int8|nf4] [--budget-gb 2] \
        [--prompt-len 128] [--new-tokens 16] [--cold] [--work-dir DIR]

``benchmarks/streaming.py`` starts one of these per contender so that peak RSS (``VmHWM``)
belongs to that contender alone. The baseline RSS is read right after ``import torch,
transformers``, before the contender's own imports.

Timing (the same for every contender): one greedy ``generate`` of ``--new-tokens`` tokens on a
fixed random prompt, with a clock at each new token (a transformers ``streamer`` for the
transformers-driven contenders, sli's ``callback``). Prefill = from the call to the first new
token (the prompt's forward pass; the first token comes from its logits); decode = the mean gap
between later tokens (one forward over one position each, with a KV cache). With ``--cold`` the
page cache is dropped after the model is loaded and again before every decode step (the drop
itself is not timed), so every pass reads its weights from disk as if the model did not fit in
the page cache; pages mapped into the process (mmap) survive a drop and stay warm. Without
``--cold``, sli first runs one warm-up ``generate`` of one token (not timed: ``warmup_s``), as
llama-bench runs one warm-up of each test: the layers its budget keeps resident are loaded
then, not inside the timed prefill.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch  # noqa: E402  (baseline RSS is measured after these two imports)
import transformers  # noqa: F401,E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402
from memory_cap import own_memory_cgroup  # noqa: E402

BASELINE_RSS_MB = M.rss_mb()
PHASES = {}


def mark_loaded() -> None:
    """Record the peak RSS so far (load, set-up) and restart the peak for the generation."""
    PHASES["load_peak_rss_mb"] = M.peak_rss_mb()
    PHASES["rss_after_load_mb"] = M.rss_mb()
    PHASES["peak_reset"] = M.reset_peak_rss()


def prompt_ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """The benchmark prompt: ``length`` token ids drawn from ``[3, vocab)`` with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=g)


class TokenClock:
    """Timestamps each new token; optionally drops the page cache between tokens (untimed)."""

    def __init__(self, cold: bool):
        self.cold = cold
        self.marks = []  # (time the token arrived, time the next step may start, read_bytes)
        self.tokens = []
        self.start = None

    def begin(self) -> None:
        self.start = (time.perf_counter(), M.read_bytes())

    def token(self, ids) -> None:
        arrived = time.perf_counter()
        rb = M.read_bytes()
        self.tokens.extend(int(t) for t in ids.reshape(-1).tolist())
        if self.cold:
            M.drop_caches()
        self.marks.append((arrived, time.perf_counter(), rb, M.read_bytes()))

    def summary(self) -> dict:
        t0, rb0 = self.start
        out = {"tokens": self.tokens}
        if not self.marks:
            return out
        out["prefill_s"] = self.marks[0][0] - t0
        out["prefill_read_bytes"] = self.marks[0][2] - rb0
        gaps = [b[0] - a[1] for a, b in zip(self.marks, self.marks[1:])]
        reads = [b[2] - a[3] for a, b in zip(self.marks, self.marks[1:])]
        if gaps:
            out["decode_s_per_token"] = sum(gaps) / len(gaps)
            out["decode_tok_s"] = len(gaps) / sum(gaps)
            out["decode_read_bytes_per_token"] = sum(reads) / len(reads)
            out["decode_steps"] = len(gaps)
        return out


class _Streamer(transformers.generation.streamers.BaseStreamer):
    """transformers calls ``put`` with the prompt first, then with each step's new tokens."""

    def __init__(self, clock: TokenClock):
        self.clock, self.seen_prompt = clock, False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.clock.token(value)

    def end(self):
        pass


def hf_generate(model, ids: torch.Tensor, new_tokens: int, cold: bool) -> dict:
    """Greedy ``generate`` on a transformers-driven model, EOS switched off so every contender
    emits exactly ``new_tokens`` tokens."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None,
                          pad_token_id=0, num_beams=1)
    clock = TokenClock(cold)
    mark_loaded()
    if cold:
        M.drop_caches()
    with torch.inference_mode():
        clock.begin()
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc, streamer=_Streamer(clock))
    return clock.summary()


# ----------------------------------------------------------------------------- contenders
def run_full(args, ids) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "config": "AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)"}
    out.update(hf_generate(model, ids, args.new_tokens, args.cold))
    return out


def run_accelerate(args, ids) -> dict:
    from transformers import AutoModelForCausalLM

    offload = tempfile.mkdtemp(prefix="offload-", dir=args.work_dir)
    budget = f"{int(args.budget_gb * 1000)}MB"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, device_map="auto",
                                                 max_memory={"cpu": budget}, offload_folder=offload)
    model.eval()
    load_s = time.perf_counter() - t0
    devmap = getattr(model, "hf_device_map", {}) or {}
    on_disk = sum(1 for v in devmap.values() if v == "disk")
    out = {"load_s": load_s, "offload_bytes": M.dir_bytes(offload),
           "config": f'from_pretrained(dir, dtype=float32, device_map="auto", max_memory={{"cpu": "{budget}"}}, '
                     f'offload_folder=tmp); {on_disk}/{len(devmap)} device-map entries on disk'}
    out.update(hf_generate(model, ids, args.new_tokens, args.cold))
    import shutil

    shutil.rmtree(offload, ignore_errors=True)
    return out


def run_airllm(args, ids, compression=None) -> dict:
    wrote = M.ensure_tokenizer(args.model_dir)
    from airllm import AutoModel

    shards = Path(args.work_dir) / "airllm-shards" / Path(args.model_dir).resolve().name
    shards.mkdir(parents=True, exist_ok=True)
    kwargs = dict(device="cpu", dtype=torch.float32, layer_shards_saving_path=str(shards))
    if compression:
        kwargs["compression"] = compression
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(args.model_dir, **kwargs)
    load_s = time.perf_counter() - t0
    if args.setup_only:
        return {"load_s": load_s, "shard_bytes": M.dir_bytes(shards), "tokenizer_written": wrote}
    out = {"load_s": load_s, "tokenizer_written": wrote, "prefetching": bool(getattr(model, "prefetching", None)),
           "shard_bytes": M.dir_bytes(shards),
           "config": "airllm.AutoModel.from_pretrained(dir, device='cpu', dtype=torch.float32, "
                     f"layer_shards_saving_path=...{', compression=%r' % compression if compression else ''})"}
    out.update(hf_generate(model, ids, args.new_tokens, args.cold))
    return out


def run_sli(args, ids) -> dict:
    from sli import QuantizationConfig, UniversalSLIProcessor

    # the budget's zero (docs/streaming.md "Memory"): the process with torch, transformers' modeling
    # code and sli imported, before sli holds anything of the model
    import_rss_mb = M.rss_mb()
    cache_dir = Path(args.work_dir) / "sli-cache" / f"{Path(args.model_dir).resolve().name}-{args.mode}"
    t0 = time.perf_counter()
    # the context this run needs, as llama-bench sizes its own (n_ctx = prompt + new tokens): the
    # memory plan's keys, values and prompt buffers are for this many positions, not 4096
    context = args.prompt_len + args.new_tokens
    proc = UniversalSLIProcessor(args.model_dir, QuantizationConfig(mode=args.mode), cache_dir=str(cache_dir),
                                 device="cpu", memory_budget_gb=args.budget_gb, prefetch=True,
                                 max_context_tokens=context)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    added = proc.prewarm(progress=False)
    prewarm_s = time.perf_counter() - t0
    if args.setup_only:
        proc.close()
        return {"load_s": load_s, "prewarm_s": prewarm_s, "prewarm_added": added, "cache_bytes": M.dir_bytes(cache_dir)}
    warmup_s = None
    if not args.cold:  # one warm-up pass, as llama-bench runs one of each test: resident layers loaded
        t0 = time.perf_counter()
        proc.generate(ids, max_new_tokens=1, eos_token_id=[])
        warmup_s = time.perf_counter() - t0
    clock = TokenClock(args.cold)
    mark_loaded()
    if args.cold:
        M.drop_caches()
    clock.begin()
    new = proc.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[], callback=clock.token)
    out = clock.summary()
    assert out["tokens"] == new.reshape(-1).tolist(), "callback tokens differ from generate()'s result"
    out.update({"load_s": load_s, "prewarm_s": prewarm_s, "prewarm_added": added, "warmup_s": warmup_s,
                "import_rss_mb": import_rss_mb,
                "cache_dir": str(cache_dir), "cache_bytes": M.dir_bytes(cache_dir),
                "memory_plan": proc.plan.describe() if hasattr(proc, "plan") else None,
                "config": f"UniversalSLIProcessor(dir, QuantizationConfig(mode={args.mode!r}), cache_dir=..., "
                          f"device='cpu', memory_budget_gb={args.budget_gb}, prefetch=True, "
                          f"max_context_tokens={context})"})
    timings = getattr(proc, "timings", None) or []
    if timings:
        decode = [t for t in timings if t.step > 0]
        if decode:
            steps = max(1, len({t.step for t in decode}))
            out["sli_per_token"] = {k: sum(getattr(t, k) for t in decode) / steps
                                    for k in ("read_s", "dequant_s", "wait_s", "compute_s")}
        from sli.timeline import timings_to_dicts

        out["timings"] = timings_to_dicts(timings)  # per layer per pass; benchmarks/streaming.py --plot draws them
    proc.close()
    return out


RUNNERS = {"full": run_full, "accelerate": run_accelerate, "airllm": run_airllm,
           "airllm-4bit": lambda a, i: run_airllm(a, i, compression="4bit"), "sli": run_sli}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contender", required=True, choices=sorted(RUNNERS))
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="none")
    p.add_argument("--budget-gb", type=float, default=2.0)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--work-dir", default=tempfile.gettempdir())
    p.add_argument("--setup-only", action="store_true",
                   help="sli: fill the layer cache; airllm: split the shards; then stop")
    args = p.parse_args(argv)
    cfg = M.model_shapes(args.model_dir)
    ids = prompt_ids(cfg["vocab_size"], args.prompt_len)
    result = {"contender": args.contender, "mode": args.mode if args.contender == "sli" else None,
              "cache": "cold" if args.cold else "warm", "baseline_rss_mb": BASELINE_RSS_MB, "ok": False,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "torch_threads": torch.get_num_threads(),
              "memory_cgroup": own_memory_cgroup()}
    try:
        result.update(RUNNERS[args.contender](args, ids))
        result["ok"] = True
    except Exception as exc:  # report any contender failure as data, the way a user would see it
        tb = traceback.format_exc()
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        result["traceback_tail"] = tb.strip().splitlines()[-6:]
    result.update(PHASES)
    result["generate_peak_rss_mb"] = M.peak_rss_mb() if PHASES.get("peak_reset") else None
    # VmHWM over the whole process: the larger of the load-phase peak and the generation peak
    result["peak_rss_mb"] = max(M.peak_rss_mb(), PHASES.get("load_peak_rss_mb", 0.0))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
