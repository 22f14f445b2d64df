"""The `sli` argument parser: every command, its options, their checks and defaults."""
from __future__ import annotations

import argparse

from .cache_command import cmd_cache
from .commands import (cmd_bench, cmd_chat, cmd_demo, cmd_eval, cmd_generate, cmd_import_gguf, cmd_serve,
                       cmd_synth, cmd_warm)
from .options import (DEFAULT_PROMPT, DEMO_BUDGET_GB, MODES, CLIParser, HelpFormatter, device_name, int_at_least,
                      block_size, non_negative_float, penalty, port_number, positive_float, probability,
                      stop_string, unit_interval)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = CLIParser(prog="sli", formatter_class=HelpFormatter,
                       description="Stream language models layer by layer through a quantized layer cache.",
                       epilog="sli COMMAND --help describes a command's options. -q and -v may also follow it.")
    parser.add_argument("--version", action="version", version=f"sli {__version__}", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info lines, errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CLIParser)
    add_parser = sub.add_parser

    def add_command(name, **kwargs):
        """A sub-command that also takes -q/-v after its name (SUPPRESS: absent, sli's own value stays)."""
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("description", kwargs.get("help"))
        p = add_parser(name, **kwargs)
        if kwargs.get("add_help", True):
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
            p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                           help="no progress bars or info lines, errors only")
        return p

    sub.add_parser = add_command

    def engine(p, mode: str, budget, json_help: str = "print the result as JSON"):
        """The options of a command that runs the streamed model."""
        p.add_argument("--mode", default=mode, help=f"quantization mode of the cached layers: {MODES}; mixed "
                                                     "(INT8 attention, NF4 MLP); int4-gptq, nf4-gptq, fp4-gptq "
                                                     "(calibrated)")
        p.add_argument("--head", choices=("auto", "int8", "keep"), default="auto",
                       help="the head on CPU: int8, or kept as stored (default auto: int8 for nf4, fp4 and int4)")
        p.add_argument("--block-size", type=block_size, default=None, metavar="N[,NAME=N...]",
                       help="NF4/FP4 values a block maximum, 32 to 4096 (default 64; 32: lower perplexity for "
                            "~0.125 bits a weight more), or INT4 values a group (even; default 128); NAME=N sizes "
                            "the linears so named apart, e.g. 32,q_proj=64,k_proj=64,o_proj=64 (NF4: 4.25 bits a weight)")
        p.add_argument("--cache-dir", help="layer cache directory (default: $SLI_CACHE_DIR, else "
                                           "$SLI_HOME/layer-cache, else ~/.cache/sli/layer-cache)")
        p.add_argument("--max-cache-size-gb", type=positive_float, default=None,
                       help="the layer cache's disk size limit in GiB, > 0 (default: 50)")
        p.add_argument("--device", type=device_name, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
        p.add_argument("--json", action="store_true", help=json_help)
        p.add_argument("--calibration-file", metavar="FILE",
                       help="UTF-8 text a calibrated mode (--mode int4-gptq, nf4-gptq, or sli warm --calibrate) "
                            "was calibrated on (default: the text that ships with sli)")
        p.add_argument("--calibration-tokens", type=int_at_least(1), default=None, metavar="N",
                       help="tokens of the calibration text to calibrate on, >= 1 (default: the mode's preset)")
        p.add_argument("--asymmetric", type=unit_interval, default=None, metavar="A",
                       help="a calibrated mode's linears fitted this fraction, 0 to 1, toward the float model's "
                            "outputs (GPTAQ; 0.25 is its usual value: better perplexity, twice the calibration "
                            "time, a third more memory; default 0: plain GPTQ)")
        if budget is not False:
            p.add_argument("--memory-budget-gb", type=positive_float, default=budget,
                           help="RAM (CPU) or GPU memory for the model in GiB, > 0; layers beyond it stream "
                                "from the cache" + (" (default: half the memory free to sli, within a container's "
                                                    "limit)" if budget is None else ""))

    def sampling(p):
        p.add_argument("--max-new-tokens", type=int_at_least(0), default=24, help="tokens to generate at most, >= 0")
        p.add_argument("--temperature", type=non_negative_float, default=0.0,
                       help="sampling temperature, >= 0; 0 = greedy (the most likely token)")
        p.add_argument("--top-k", type=int_at_least(1), default=None,
                       help="sample among the k most likely tokens, >= 1 (default: all)")
        p.add_argument("--top-p", type=probability, default=None,
                       help="sample among the most likely tokens whose probabilities add up to p, in (0, 1] "
                            "(default: 1, all)")
        p.add_argument("--min-p", type=unit_interval, default=None,
                       help="sample only among tokens at least MIN_P times as likely as the most likely one (after "
                            "the temperature, as transformers), in [0, 1] (default: 0, off)")
        p.add_argument("--repetition-penalty", type=penalty, default=1.0,
                       help="divide the logits of tokens already in the prompt or the answer by this (multiply "
                            "negative ones; greedy too), > 0; 1 = off, 1.1 to 1.3 usual")
        p.add_argument("--stop", action="append", type=stop_string, metavar="TEXT",
                       help="end the answer where TEXT appears, TEXT not included; repeatable (default: none)")
        p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one)")

    p = sub.add_parser("warm", help="quantize every layer of a model into the layer cache (resumable)")
    p.add_argument("model_dir", help="local Hugging Face model directory")
    engine(p, "int8", False)
    p.add_argument("--memory-budget-gb", type=positive_float, default=None,
                   help="RAM (CPU) or GPU memory a calibrated warm may hold, GiB > 0: its activation chunks are "
                        "sized to fit, and a budget too small for one layer is refused (default: no limit)")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate the 4-bit --mode (GPTQ, layer by layer on sample text) instead of rounding: "
                        "--mode int4 --calibrate is --mode int4-gptq")
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("generate", help="stream an answer to a prompt",
                       description="sli generate PROMPT (the default model, or --model DIR); sli generate MODEL "
                                   "PROMPT; sli generate [MODEL] -f FILE (- reads stdin). The tokenizer's chat "
                                   "template is applied when it has one (--raw turns it off); the answer goes to "
                                   "stdout, the figures to stderr.")
    p.add_argument("words", nargs="*", metavar="[MODEL] PROMPT",
                   help="the prompt, after a model directory if the first argument is one")
    p.add_argument("--model", help="local model directory (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("-f", "--file", dest="prompt_file", metavar="FILE",
                   help="read the prompt from FILE, or from stdin with - (default: the PROMPT argument, else "
                        f"{DEFAULT_PROMPT!r})")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as it is, without the tokenizer's chat template (text completion)")
    p.add_argument("--system", metavar="TEXT", help="a system prompt (needs a chat template; default: the "
                                                    "template's own, if any)")
    engine(p, "int8", None)
    sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="a conversation in the terminal (the model's chat template; the KV cache "
                                    "kept between turns)",
                       description="sli chat [MODEL]: type a message, the answer streams; /exit or Ctrl-D quits, "
                                   "Ctrl-C stops an answer. Each turn feeds only its own tokens.")
    p.add_argument("model_dir", nargs="?", help="local model directory (default: SmolLM2-135M-Instruct, converted once)")
    p.add_argument("--system", metavar="TEXT", help="a system prompt (default: the template's own, if any)")
    engine(p, "int8", None)
    sampling(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=256)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; concurrent requests share each pass "
                                     "over the layers",
                       description="sli serve [MODEL]: POST /v1/chat/completions (the tokenizer's chat template; "
                                   "stream: true as server-sent events), POST /v1/completions, GET /v1/models, "
                                   "GET /health. Requests that arrive while others run join the next pass over "
                                   "the layers (continuous batching). See docs/serving.md.")
    p.add_argument("model_dir", nargs="?", help="local model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port")
    p.add_argument("--model-name", default=None,
                   help="the model id clients pass (default: the model directory's name)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: $SLI_API_KEY, else none)")
    p.add_argument("--max-batch-size", type=int_at_least(1), default=8, help="sequences in one pass at most")
    p.add_argument("--max-queue", type=int_at_least(1), default=64,
                   help="requests waiting for a place in the batch at most; more are answered 429")
    p.add_argument("--kv-budget-gb", type=positive_float, default=None,
                   help="GiB the keys and values of all active sequences may take together; a request waits "
                        "until its prompt + max_tokens fit (default: the memory plan's KV allowance, the "
                        "model's context up to 4096 positions)")
    engine(p, "int8", None, json_help="print the server's address and settings as one JSON line once it is ready")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the default model end to end under a small memory budget")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question to ask")
    engine(p, "int8", DEMO_BUDGET_GB)
    sampling(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cache", help="inspect, verify, clear a layer cache or remove one model from it",
                       description="sli cache info | verify [--remove] | clear | rm MODEL_ID [--mode M]")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=CLIParser)
    cache_dir_help = ("layer cache directory (default: $SLI_CACHE_DIR, else $SLI_HOME/layer-cache, else "
                      "~/.cache/sli/layer-cache)")
    for name, helptext in (("info", "entries, bytes and last use per model and mode"),
                           ("verify", "check every entry's checksum and format; --remove deletes the bad ones"),
                           ("clear", "remove every entry (of every model and mode)"),
                           ("rm", "remove one model's entries, or one mode's of it")):
        q = actions.add_parser(name, help=helptext, description=helptext, formatter_class=HelpFormatter)
        q.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        q.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars or info lines, errors only")
        if name == "rm":
            q.add_argument("model_id", metavar="MODEL_ID", help="a model id as `sli cache info` lists it, or a model "
                                                             "directory (its id is computed from its content)")
            q.add_argument("--mode", default=None, help=f"only this mode's entries: {MODES}, or mixed "
                                                        "(default: every mode)")
        q.add_argument("--cache-dir", help=cache_dir_help)
        if name == "verify":
            q.add_argument("--remove", action="store_true", help="delete the bad entries (default: report them)")
        q.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("eval", help="quality per quantization mode: perplexity, KL, top-1 agreement, bytes")
    p.add_argument("model_dir", nargs="?", help="local model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--modes", default="none,int8,int8_dynamic,nf4,fp4,int4,fp8,mixed",
                   help="comma-separated modes to compare with none")
    p.add_argument("--text", help="UTF-8 text file to score (default: the standard library's pydoc_data.topics)")
    p.add_argument("--windows", type=int_at_least(1), default=4, help="number of windows scored, >= 1")
    p.add_argument("--window", type=int_at_least(2), default=512,
                   help="tokens per window, >= 2; capped at the model's positions")
    p.add_argument("--asymmetric", type=unit_interval, default=None, metavar="A",
                   help="the calibrated modes (int4-gptq, nf4-gptq, ...) fitted this fraction, 0 to 1, toward the "
                        "float model's outputs (GPTAQ; default 0: plain GPTQ)")
    p.add_argument("--block-size", type=block_size, default=None, metavar="N[,NAME=N...]",
                   help="NF4/FP4 values a block maximum in the nf4, fp4, nf4-gptq, fp4-gptq and mixed modes, 32 "
                        "to 4096 (default 64), and INT4 values a group in int4 and int4-gptq (even; default 128); "
                        "NAME=N sizes the linears so named apart (32,q_proj=64)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("synth", help="write a random-initialized model of a real model's shapes")
    p.add_argument("out_dir", help="the folder to write")
    p.add_argument("--family", default="llama",
                   help="model family: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3, gpt2, mixtral, ... "
                        "(an unknown one lists them all)")
    p.add_argument("--preset", default="tiny", help="size preset of the family, e.g. tiny; llama also has small, "
                                                    "168m, smollm2-135m, 1b, 7b")
    p.add_argument("--layers", type=int_at_least(1), default=None,
                   help="decoder layers, >= 1 (default: the preset's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the stored weights")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same weights")
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                   help="write no tokenizer (by default a byte-level one, so generate and eval take text)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("import-gguf", help="turn a GGUF file into a local Hugging Face directory")
    p.add_argument("gguf_file", help="the .gguf file")
    p.add_argument("out_dir", help="the folder to write; it must be missing or empty unless --force")
    p.add_argument("--force", action="store_true", help="replace an existing out_dir (its files are deleted)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_import_gguf)

    # Everything after `bench` (its --help included) goes to the script verbatim: see main().
    p = sub.add_parser("bench", add_help=False,
                       help="side-by-side streaming benchmark (benchmarks/streaming.py; `sli bench --help` lists "
                            "its options; --plot FILE.png draws sli's per-layer timeline)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for benchmarks/streaming.py")
    p.set_defaults(func=cmd_bench)
    return parser

