"""`sli serve` under concurrent clients: time to first token, and what batching buys.

Run (clients are `openai` clients in threads of this process, released together; everything on
127.0.0.1):

    .venv/bin/python benchmarks/serve.py chat [--clients 16] [--mode int8] [--budget-gb 0.3]
        # the default model (SmolLM2-135M-Instruct, offline), served by a child process: one lone
        # greedy streamed request per question, then N concurrent streamed chat clients: are all
        # answers the lone ones; p50 / p90 time to first token (the first content chunk)
    .venv/bin/python benchmarks/serve.py decode --model-dir DIR [--clients-list 1,8] [--tokens 4,16]
        [--mode int8] [--budget-gb 1.2] [--max-context 1024] [--rounds 2]
        # a streamed model (e.g. `sli synth DIR --family llama --preset 7b --layers 4`), served
        # from a thread of this process: C clients each asking for N tokens (ignore_eos); the
        # aggregate decode rate is C * (N2 - N1) / (T(N2) - T(N1)), so prompts and admission
        # cancel out. Measured the same way, alternating with the server runs on the same
        # processor: processor.generate of one prompt (`sli generate`'s path) and of one static
        # batch of C prompts (one KV cache: each linear multiplies every row at once), what a
        # batched decode step could reach.

Prints a JSON object (--json FILE also writes it). Peak RSS is VmHWM, reset once the model is
loaded and warm (the chat part's server process; the decode part's own process).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

QUESTIONS = ["What is the capital of France?", "What is 2+2?", "Name the largest ocean on Earth.",
             "What color is the sky on a clear day?"]


# ---------------------------------------------------------------------- the server child
def child(args) -> None:
    sys.path.insert(0, str(ROOT))
    from sli.processor import UniversalSLIProcessor
    from sli.quantization import QuantizationConfig
    from sli.server import serve

    baseline_mb = rss_mb()  # python, torch, transformers, starlette, uvicorn: before any model

    model_dir = args.model_dir
    if model_dir == "default":
        from sli.default_model import ensure_default_model

        model_dir = ensure_default_model(progress=False)
    processor = UniversalSLIProcessor(model_dir, QuantizationConfig(mode=args.mode), cache_dir=args.cache_dir,
                                      device="cpu", memory_budget_gb=args.budget_gb,
                                      max_context_tokens=args.max_context)
    processor.prewarm(progress=False)
    before_tokenizer = rss_mb()
    try:
        processor.tokenizer()  # what the server loads first: counted apart from the model's budget
    except Exception:  # a random model has none
        pass
    info = {"baseline_rss_mb": round(baseline_mb, 1), "tokenizer_rss_mb": round(rss_mb() - before_tokenizer, 1),
            "plan": processor.plan.describe(),
            "resident_layers": len(processor.plan.resident_layers),
            "num_layers": processor.layout.num_layers, "kv_bytes_per_token": processor.kv_bytes(1)}
    print("READY " + json.dumps(info), flush=True)
    Path("/proc/self/clear_refs").write_text("5")  # the serving peak, not the load's
    serve(processor, host="127.0.0.1", port=args.port, model_name="bench", max_batch_size=args.max_batch,
          max_queue=64, log_level="warning")


def rss_mb(pid="self", field="VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return -1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    def __init__(self, model_dir, mode, budget_gb, cache_dir, max_batch, max_context):
        self.port = free_port()
        cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--mode", mode,
               "--cache-dir", str(cache_dir), "--port", str(self.port), "--max-batch", str(max_batch),
               "--max-context", str(max_context)]
        if budget_gb is not None:
            cmd += ["--budget-gb", str(budget_gb)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        line = ""
        while not line.startswith("READY "):
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"the server child exited ({self.proc.returncode})")
        self.info = json.loads(line[6:])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def get(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def peak_rss_mb(self) -> float:
        return rss_mb(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def client(url):
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)


def together(count, work):
    """Run ``work(i)`` in ``count`` threads released at once; (results, wall seconds)."""
    barrier = threading.Barrier(count + 1)
    results = [None] * count

    def run(i):
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


# ---------------------------------------------------------------------- parts
def chat_part(args) -> dict:
    server = Child("default", args.mode, args.budget_gb, Path(args.work_dir) / "cache", max(16, args.clients),
                   args.max_context)
    try:
        def ask(question):
            t0 = time.perf_counter()
            first, parts = None, []
            stream = client(server.url).chat.completions.create(
                model="bench", messages=[{"role": "user", "content": question}], max_tokens=args.max_tokens,
                temperature=0, stream=True)
            for chunk in stream:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    first = first or time.perf_counter() - t0
                    parts.append(text)
            return first, "".join(parts), time.perf_counter() - t0

        lone = {q: ask(q) for q in QUESTIONS}
        results, wall = together(args.clients, lambda i: ask(QUESTIONS[i % len(QUESTIONS)]))
        ttft = sorted(r[0] for r in results)
        correct = sum(r[1] == lone[QUESTIONS[i % len(QUESTIONS)]][1] for i, r in enumerate(results))
        stats = server.get("/health")[1]["engine"]
        return {"part": "chat", "model": "SmolLM2-135M-Instruct", "mode": args.mode, "budget_gb": args.budget_gb,
                "clients": args.clients, "max_tokens": args.max_tokens, "plan": server.info["plan"],
                "lone_answers": {q: v[1] for q, v in lone.items()},
                "lone_ttft_s": {q: round(v[0], 3) for q, v in lone.items()},
                "correct": f"{correct}/{args.clients}", "ttft_p50_s": round(statistics.median(ttft), 3),
                "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 3), "ttft_max_s": round(ttft[-1], 3),
                "wall_s": round(wall, 2), "peak_batch": stats["peak_batch"],
                "peak_kv_mb": round(stats["peak_kv_bytes"] / 1e6, 2),
                "kv_budget_mb": round(stats["kv_budget_bytes"] / 1e6, 2),
                "peak_rss_serving_mb": round(server.peak_rss_mb(), 1),
                "baseline_rss_mb": server.info["baseline_rss_mb"], "tokenizer_rss_mb": server.info["tokenizer_rss_mb"],
                "peak_above_runtime_mb": round(server.peak_rss_mb() - server.info["baseline_rss_mb"]
                                               - server.info["tokenizer_rss_mb"], 1),
                "budget_mb": round(args.budget_gb * 1024, 1), "kv_budget_mib": round(stats["kv_budget_bytes"] / 2**20, 1)}
    finally:
        server.stop()


class InProcess:
    """The processor, and uvicorn serving it from a thread of this process: ``generate`` can then
    run on the same processor between HTTP runs (the engine is idle then), alternating with them."""

    def __init__(self, args) -> None:
        sys.path.insert(0, str(ROOT))
        import uvicorn

        from sli.processor import UniversalSLIProcessor
        from sli.quantization import QuantizationConfig
        from sli.server import build_app

        self.baseline_mb = rss_mb()
        self.processor = UniversalSLIProcessor(args.model_dir, QuantizationConfig(mode=args.mode),
                                               cache_dir=Path(args.work_dir) / "cache", device="cpu",
                                               memory_budget_gb=args.budget_gb, max_context_tokens=args.max_context)
        self.processor.prewarm(progress=False)
        app, self.engine = build_app(self.processor, model_name="bench", max_batch_size=args.max_batch, max_queue=64)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.processor.close()


def decode_part(args) -> dict:
    import torch

    clients = [int(c) for c in args.clients_list.split(",")]
    n1, n2 = (int(n) for n in args.tokens.split(","))
    args.max_batch = max(clients)
    served = InProcess(args)
    proc = served.processor

    def prompt(i):
        return [3 + (7 * i + j) % 190 for j in range(16)]

    def http(count, tokens):
        def one(i):
            answer = client(served.url).completions.create(model="bench", prompt=prompt(i), max_tokens=tokens,
                                                           temperature=0, extra_body={"ignore_eos": True})
            assert answer.usage.completion_tokens == tokens
        return together(count, one)[1]

    def generate(count, tokens):
        """`sli generate`'s path: processor.generate; count > 1 is one static batch (one KV cache,
        each linear multiplies every row at once), what a batched decode step could reach."""
        ids = torch.tensor([prompt(i) for i in range(count)])
        t0 = time.perf_counter()
        proc.generate(ids, max_new_tokens=tokens, eos_token_id=[])
        return time.perf_counter() - t0

    try:
        http(1, 2), generate(1, 2)  # first runs: page cache, allocator, threads
        Path("/proc/self/clear_refs").write_text("5")  # the serving peak, not the load's
        configs = [("generate", 1, generate), ("server", 1, http)] + [("server", c, http) for c in clients if c > 1] \
            + [("generate static batch", c, generate) for c in clients if c > 1]
        rates = {(name, c): [] for name, c, _ in configs}
        for _ in range(args.rounds):  # alternate, so drift in the machine's speed hits every config alike
            for name, count, run in configs:
                t1, t2 = run(count, n1), run(count, n2)
                rates[(name, count)].append(count * (n2 - n1) / (t2 - t1))
        base = statistics.median(rates[("server", 1)])
        rows = [{"path": name, "clients": count, "aggregate_decode_tokens_per_s": round(statistics.median(r), 3),
                 "runs": [round(x, 3) for x in r], "vs_1_client": round(statistics.median(r) / base, 2)}
                for (name, count), r in rates.items()]
        stats = served.engine.stats()
        plan = proc.plan
        return {"part": "decode", "model_dir": str(args.model_dir), "mode": args.mode, "budget_gb": args.budget_gb,
                "max_context": args.max_context, "plan": plan.describe(),
                "resident_layers": f"{len(plan.resident_layers)}/{proc.layout.num_layers}",
                "tokens": [n1, n2], "rounds": args.rounds, "rows": rows,
                "one_client_vs_generate": round(base / statistics.median(rates[("generate", 1)]), 3),
                "peak_batch": stats["peak_batch"], "peak_kv_mb": round(stats["peak_kv_bytes"] / 1e6, 2),
                "kv_budget_mb": round(stats["kv_budget_bytes"] / 1e6, 2),
                "peak_rss_serving_mb": round(rss_mb("self", "VmHWM"), 1),
                "baseline_rss_mb": round(served.baseline_mb, 1)}
    finally:
        served.stop()


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="minutes"), "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", nargs="?", choices=["chat", "decode"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help="decode: the streamed model's directory")
    parser.add_argument("--mode", default="int8")
    parser.add_argument("--budget-gb", type=float, default=None, help="default: chat 0.3, decode 1.2")
    parser.add_argument("--max-context", type=int, default=1024, help="positions the memory plan reserves KV for")
    parser.add_argument("--clients", dest="clients", type=int, default=16, help="chat: concurrent clients")
    parser.add_argument("--clients-list", default="1,8", help="decode: client counts")
    parser.add_argument("--tokens", default="4,16", help="decode: the two answer lengths N1,N2")
    parser.add_argument("--rounds", type=int, default=2, help="decode: rounds over the configurations")
    parser.add_argument("--max-tokens", type=int, default=24, help="chat: max_tokens")
    parser.add_argument("--work-dir", default="/tmp/sli-serve-bench")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.part is None:
        parser.error("choose a part: chat or decode")
    if args.budget_gb is None:
        args.budget_gb = 0.3 if args.part == "chat" else 1.2
    if args.part == "decode" and not args.model_dir:
        parser.error("decode needs --model-dir (e.g. `sli synth DIR --family llama --preset 7b --layers 4`)")
    result = {"machine": machine(), **(chat_part(args) if args.part == "chat" else decode_part(args))}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
