"""The ``sli`` command: thin wrappers that parse, configure logging and call the library."""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

from .errors import SLIError

logger = logging.getLogger("sli")

DEFAULT_PROMPT = "What is the capital of France?"
MODES = "none, int8, int8_dynamic, nf4, fp4, int4, fp8"
# The demo's memory budget, GiB: above what the processor holds whatever the budget (for SmolLM2
# in int8: the 0.05 GiB embedding, 0.01 GiB of layers in flight, the 0.16 GiB kernel runtime and the
# KV of the run's few dozen positions; 0.22 GiB in all), so the plan has room and does not warn;
# below the checkpoint's 0.25 GiB (0.27 GB) of bf16 weights, so most of its 30 layers stream.
DEMO_BUDGET_GB = 0.24


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), so the peak reported is the run's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class CLIParser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one ``sli: error: ...`` line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"sli: error: {message} (see `{self.prog} --help`)\n")


def _finite(text: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {text}")
    return value


def probability(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def int_at_least(low: int):
    def parse(text: str) -> int:
        value = _finite(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def device_name(text: str) -> str:
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def valid_modes() -> List[str]:
    from .quantization import QuantizationMode

    return [m.value for m in QuantizationMode] + ["mixed"]


def _check_mode(mode: str, option: str = "--mode") -> str:
    modes = valid_modes()
    if mode not in modes:
        raise SLIError(f"{option} {mode!r} is not a quantization mode; valid modes: {', '.join(modes)}")
    return mode


def _check_device(device: Optional[str]) -> None:
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SLIError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    count = torch.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= count:
        raise SLIError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def _checked_model_dir(path: Path) -> "tuple[Path, dict]":
    """``path`` and its config, when it is a local decoder-only causal LM; else a one-line error."""
    from .errors import ModelLoadError
    from .model_check import check_causal_lm

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a directory; pass the folder holding config.json and the weights")
    return path, check_causal_lm(path)


def _config(mode: str):
    from .quantization import QuantizationConfig, QuantizationRegistry, get_mixed_precision_config

    if mode == "mixed":
        return get_mixed_precision_config()
    try:
        return QuantizationRegistry.get(mode)
    except KeyError:
        return QuantizationConfig(mode=mode)  # raises ValueError listing the modes


def _bars(args) -> bool:
    """Progress bars: only on a terminal, and not with -q. Turns transformers' own bars (loading,
    saving shards) off otherwise; sli's are passed the answer."""
    shown = not args.quiet and sys.stderr.isatty()
    if not shown:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return shown


def _model_dir(args) -> Path:
    if getattr(args, "model_dir", None):
        return Path(args.model_dir).expanduser()
    from .default_model import ensure_default_model

    return ensure_default_model(progress=not args.quiet)


def _processor(args, model_dir: Path, **kwargs):
    from .processor import UniversalSLIProcessor

    _check_mode(args.mode)
    _check_device(args.device)
    model_dir, _ = _checked_model_dir(model_dir)
    return UniversalSLIProcessor(model_dir, _config(args.mode), cache_dir=args.cache_dir, device=args.device,
                                 max_cache_size_gb=args.max_cache_size_gb,
                                 memory_budget_gb=getattr(args, "memory_budget_gb", None),
                                 max_gpu_memory_gb=getattr(args, "memory_budget_gb", None), **kwargs)


def cmd_warm(args) -> int:
    _bars(args)
    proc = _processor(args, _model_dir(args))
    t0 = time.perf_counter()
    added = proc.prewarm(progress=_bars(args))
    stats = proc.cache.stats().to_dict()
    result = {"model_id": proc.model_id, "layers": proc.layout.num_layers, "added": added,
              "seconds": round(time.perf_counter() - t0, 2), "cache": stats}
    _emit(args, result, f"warmed {proc.model_id}: {added} new of {proc.layout.num_layers} layers in "
                        f"{result['seconds']} s; cache holds {stats['entries']} entries, {stats['disk_bytes'] / 1e6:.1f} MB")
    proc.close()
    return 0


def _read_prompt_file(name: str) -> str:
    if name == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SLIError(f"prompt file {name} is not UTF-8 text ({exc.reason})") from None
        except IsADirectoryError:
            raise SLIError(f"prompt file {name} is a directory; -f takes a text file, or - for stdin") from None
        except FileNotFoundError:
            raise SLIError(f"prompt file {name} does not exist") from None
    text = text.rstrip("\n")
    if not text.strip():
        raise SLIError(f"the prompt from {'stdin' if name == '-' else name} is empty")
    return text


def _looks_like_a_path(text: str) -> bool:
    return not any(c.isspace() for c in text) and text.startswith(("/", "./", "../", "~/"))


def _generate_inputs(args) -> "tuple[Optional[str], str]":
    """(model directory or None for the default model, prompt) from generate's arguments.

    ``generate PROMPT`` (the default model, or --model DIR), ``generate MODEL PROMPT``,
    ``generate MODEL`` (an existing directory; the default prompt or -f), ``-f FILE`` / ``-f -``.
    """
    words = list(args.words)
    if len(words) > 2:
        raise SLIError(f"generate takes at most MODEL and PROMPT, got {len(words)} arguments; quote the prompt")
    model = args.model
    if len(words) == 2:
        if model is not None:
            raise SLIError(f"the model is given twice ({words[0]!r} and --model {model!r}); pass one")
        model, prompt = words
    elif len(words) == 1 and model is None and Path(words[0]).expanduser().is_dir():
        model, prompt = words[0], None
    elif len(words) == 1:
        if model is None and _looks_like_a_path(words[0]):
            # `sli generate ./typo` should not convert the default model and ask it about "./typo"
            raise SLIError(f"model directory {words[0]!r} does not exist; to send that text as a prompt "
                           f"to the default model, pass it with -f - (stdin)")
        prompt = words[0]
    else:
        prompt = None
    if args.prompt_file is not None:
        if prompt is not None:
            raise SLIError("the prompt is given twice (an argument and -f); pass one")
        prompt = _read_prompt_file(args.prompt_file)
    return model, DEFAULT_PROMPT if prompt is None else prompt


def _stop_ids(proc, tok) -> List[int]:
    from .chat_template import stop_token_ids

    generation_config = None
    path = Path(proc.model_dir) / "generation_config.json"
    if path.is_file():
        try:
            generation_config = argparse.Namespace(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            generation_config = None
    return stop_token_ids(tok, proc.config, generation_config)


def cmd_generate(args) -> int:
    import torch

    from .chat_template import encode_prompt

    from .model_check import load_tokenizer, max_positions

    model, prompt_text = _generate_inputs(args)
    _check_mode(args.mode)
    _check_device(args.device)
    _bars(args)
    args.model_dir = model
    model_dir, config = _checked_model_dir(_model_dir(args))
    tok = load_tokenizer(model_dir)
    prompt = encode_prompt(tok, prompt_text, system=args.system, raw=args.raw)
    limit = max_positions(config)
    max_new_tokens = args.max_new_tokens
    if limit is not None:
        if len(prompt.ids) > limit:
            raise SLIError(f"the prompt is {len(prompt.ids)} tokens{' with the chat template' if prompt.templated else ''}"
                           f", more than this model's limit of {limit} positions (max_position_embeddings); "
                           "shorten it")
        room = limit - len(prompt.ids)  # the processor reserves a position for every new token
        if room == 0 and max_new_tokens > 0:
            raise SLIError(f"the prompt is {len(prompt.ids)} tokens, all of this model's {limit} positions "
                           "(max_position_embeddings): none is left for an answer; shorten it")
        if max_new_tokens > room:
            logger.warning("--max-new-tokens %d would run past the model's %d positions after a %d-token prompt; "
                           "generating at most %d", max_new_tokens, limit, len(prompt.ids), room)
            max_new_tokens = room
    # The plan reserves keys and values for this run's context, no more (the processor's default
    # is the model's whole context, up to 4096 positions: 0.09 GB for SmolLM2 at bfloat16).
    proc = _processor(args, model_dir, max_context_tokens=len(prompt.ids) + max_new_tokens)
    proc.plan  # made (and logged once, by the processor) before the warm-up, as the first thing said
    warm_t0 = time.perf_counter()
    proc.prewarm(progress=_bars(args))
    warm_s = time.perf_counter() - warm_t0
    printed: List[int] = []

    def on_token(token):
        printed.append(int(token[0]))
        if not args.json:
            text = tok.decode(printed, skip_special_tokens=True)
            previous = tok.decode(printed[:-1], skip_special_tokens=True)
            sys.stdout.write(text[len(previous):])
            sys.stdout.flush()

    if not args.json and not prompt.templated:
        sys.stdout.write(prompt_text)  # a completion continues the text; a chat answer stands alone
        sys.stdout.flush()
    _reset_peak_rss()  # conversion and warm-up are not part of the generation's peak
    t0 = time.perf_counter()
    first_token_at = []
    new = proc.generate(torch.tensor([prompt.ids], dtype=torch.long), max_new_tokens=max_new_tokens,
                        do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k,
                        top_p=args.top_p, eos_token_id=_stop_ids(proc, tok),
                        callback=lambda t: (first_token_at.append(time.perf_counter()) if not first_token_at else None,
                                            on_token(t)), seed=args.seed)
    total = time.perf_counter() - t0
    n = new.shape[1]
    prefill = (first_token_at[0] - t0) if first_token_at else total
    decode_tps = (n - 1) / (total - prefill) if n > 1 and total > prefill else 0.0
    stats = proc.cache.stats().to_dict()
    result = {"model_id": proc.model_id, "mode": args.mode, "prompt": prompt_text, "chat_template": prompt.templated,
              "prompt_tokens": len(prompt.ids), "text": tok.decode(new[0], skip_special_tokens=True),
              "new_tokens": n, "prefill_s": round(prefill, 3), "decode_tokens_per_s": round(decode_tps, 2),
              "warm_s": round(warm_s, 2), "peak_rss_mb": round(_peak_rss_mb(), 1),
              "resident_layers": len(proc.plan.resident_layers), "num_layers": proc.layout.num_layers,
              "cache": stats}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        if not args.quiet:  # stdout holds the text alone; the figures go to stderr
            print(f"[{n} tokens: prefill {prefill:.2f} s, decode {decode_tps:.2f} tokens/s, peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB; {result['resident_layers']}/{result['num_layers']} layers "
                  f"resident, {result['num_layers'] - result['resident_layers']} streamed; cache hits: memory "
                  f"{stats['memory_hits']}, disk "
                  f"{stats['disk_hits']}, misses {stats['disk_misses']}]", file=sys.stderr)
    proc.close()
    return 0


def _mode_labels():
    from .cache_report import mode_labels
    from .quantization import QuantizationConfig

    labels = mode_labels(valid_modes(), _config)
    for fingerprint, mode in mode_labels([m for m in valid_modes() if m != "mixed"],
                                         lambda m: QuantizationConfig(mode=m)).items():
        labels.setdefault(fingerprint, mode)
    return labels


def _when(timestamp: Optional[float]) -> str:
    return "unknown" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _megabytes(size: Optional[int]) -> str:
    return "? MB" if size is None else f"{size / 1e6:.1f} MB"


def cmd_cache(args) -> int:
    from .cache_report import Fingerprint, group_entries, index_rows, is_layer_cache
    from .layer_cache import LayerCache
    from .processor import default_cache_dir

    cache_dir = Path(args.cache_dir or default_cache_dir()).expanduser()
    if not cache_dir.exists():
        raise SLIError(f"no layer cache at {cache_dir}: the folder does not exist (`sli warm MODEL_DIR "
                       f"--cache-dir {cache_dir}` makes one)")
    if not is_layer_cache(cache_dir):
        # Opening it would create an index there: a user's ordinary folder is left as it is.
        raise SLIError(f"{cache_dir} is not a layer cache (no cache.db in it); nothing was changed")
    with LayerCache(cache_dir) as cache:
        if args.action == "info":
            groups = group_entries(cache.entries(), index_rows(cache_dir), _mode_labels())
            stats = cache.stats()
            data = {"cache_dir": str(cache_dir), "entries": stats.entries, "disk_bytes": stats.disk_bytes,
                    "models": [g.to_dict() for g in groups]}
            lines = [f"{cache_dir}: {stats.entries} entries, {stats.disk_bytes / 1e6:.1f} MB on disk"]
            width = max([len(g.model_id) for g in groups] + [5])
            if groups:
                lines.append(f"  {'model':<{width}}  {'mode':<12}  {'entries':>7}  {'size':>10}  last used")
            for g in groups:
                mode = g.mode if g.mode != "custom" else f"custom:{g.fingerprint[:8]}"
                lines.append(f"  {g.model_id:<{width}}  {mode:<12}  {len(g.layers):>7}  {_megabytes(g.bytes):>10}  "
                             f"{_when(g.last_used)}")
            _emit(args, data, "\n".join(lines))
        elif args.action == "verify":
            store_logger = logging.getLogger("sli.layer_store")
            level = store_logger.level
            if not args.remove:
                # The store logs each bad entry as "removed" even when it is not; the lines
                # below say what happened instead.
                store_logger.setLevel(logging.ERROR)
            try:
                total = len(cache.entries())
                bad = cache.verify(remove=args.remove)
            finally:
                store_logger.setLevel(level)
            if not bad:
                line = f"{total} entries checked; no bad entries found"
            elif args.remove:
                line = f"{len(bad)} bad entries found and removed (of {total} checked)"
            else:
                line = (f"{len(bad)} bad entries found (of {total} checked); nothing was removed: rerun with --remove "
                        "to delete them")
            bad_lines = [f"  bad: {b}" for b in bad]
            _emit(args, {"cache_dir": str(cache_dir), "checked": total, "bad": [str(b) for b in bad],
                         "removed": bool(args.remove and bad)}, "\n".join(bad_lines + [line]))
            return 1 if bad and not args.remove else 0
        elif args.action == "rm":
            entries = [e for e in cache.entries() if e["model_id"] == args.model_id]
            if not entries:
                known = sorted({e["model_id"] for e in cache.entries()})
                raise SLIError(f"no entries for model {args.model_id!r} in {cache_dir}; cached models: "
                               f"{', '.join(known) if known else 'none'} (see `sli cache info`)")
            labels = _mode_labels()
            if args.mode is not None:
                _check_mode(args.mode)
                chosen = [e for e in entries if labels.get(e["fingerprint"]) == args.mode]
                if not chosen:
                    held = sorted({labels.get(e["fingerprint"], "custom") for e in entries})
                    raise SLIError(f"no {args.mode} entries for model {args.model_id!r} in {cache_dir}; it has: "
                                   f"{', '.join(held)}")
                entries = chosen
            removed = sum(cache.delete(e["model_id"], e["layer"], Fingerprint(e["fingerprint"])) for e in entries)
            what = f"{args.model_id}" + (f" ({args.mode})" if args.mode else "")
            _emit(args, {"cache_dir": str(cache_dir), "model_id": args.model_id, "mode": args.mode,
                         "removed": removed}, f"removed {removed} entries of {what} from {cache_dir}")
        else:
            count = len(cache.entries())
            cache.clear()
            _emit(args, {"cache_dir": str(cache_dir), "cleared": True, "removed": count},
                  f"cleared {cache_dir}: {count} entries removed")
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate_modes, format_report

    from .model_check import max_positions

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise SLIError(f"--modes {args.modes!r} names no mode; valid modes: {', '.join(valid_modes())}")
    for m in modes:
        _check_mode(m, "--modes: mode")
    _bars(args)
    model_dir, config = _checked_model_dir(_model_dir(args))
    window = args.window
    limit = max_positions(config)
    if limit is not None and window > limit:
        logger.info("windows of %d tokens: the model has %d positions (--window %d)", limit, limit, window)
        window = limit
    report = evaluate_modes(model_dir, modes, text_path=args.text, num_windows=args.windows,
                            window=window, progress=not args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_synth(args) -> int:
    import torch

    _bars(args)
    from .synth import synth_model

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    path = synth_model(args.out_dir, family=args.family, preset=args.preset, num_layers=args.layers, dtype=dtype,
                       seed=args.seed, with_tokenizer=args.tokenizer)
    _emit(args, {"model_dir": str(path)}, f"wrote {path}")
    return 0


def cmd_import_gguf(args) -> int:
    from .default_model import import_gguf

    _bars(args)
    path = import_gguf(Path(args.gguf_file), Path(args.out_dir), force=args.force)
    _emit(args, {"model_dir": str(path)}, f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "streaming.py"
    if not script.is_file():
        raise SLIError(f"{script} is missing: `sli bench` runs the repository's benchmarks/streaming.py; run it from a source checkout")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_demo(args) -> int:
    """Convert the default model once, warm its cache, stream it under a small budget."""
    args.words, args.model, args.prompt_file = [args.prompt], None, None
    args.system, args.raw = None, False
    return cmd_generate(args)


def _emit(args, data: dict, line: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else line)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is nothing to show (a flag,
    no value) or the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = any(action.default is value for value in (None, False, True, argparse.SUPPRESS))
        if "default" in text or nothing or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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
        p.add_argument("--mode", default=mode, help=f"quantization mode of the cached layers: {MODES}, or mixed "
                                                     "(INT8 attention, NF4 MLP)")
        p.add_argument("--cache-dir", help="layer cache directory (default: $SLI_CACHE_DIR, else "
                                           "$SLI_HOME/layer-cache, else ~/.cache/sli/layer-cache)")
        p.add_argument("--max-cache-size-gb", type=positive_float, default=None,
                       help="the layer cache's disk size limit in GiB, > 0 (default: 50)")
        p.add_argument("--device", type=device_name, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
        p.add_argument("--json", action="store_true", help=json_help)
        if budget is not False:
            p.add_argument("--memory-budget-gb", type=positive_float, default=budget,
                           help="RAM (CPU) or GPU memory for the model in GiB, > 0; layers beyond it stream "
                                "from the cache" + (" (default: no limit: half the free memory)" if budget is None
                                                    else ""))

    def sampling(p):
        p.add_argument("--max-new-tokens", type=int_at_least(0), default=24, help="tokens to generate at most, >= 0")
        p.add_argument("--temperature", type=non_negative_float, default=0.0,
                       help="sampling temperature, >= 0; 0 = greedy (the most likely token)")
        p.add_argument("--top-k", type=int_at_least(1), default=None,
                       help="sample among the k most likely tokens, >= 1 (default: all)")
        p.add_argument("--top-p", type=probability, default=None,
                       help="sample among the most likely tokens whose probabilities add up to p, in (0, 1] "
                            "(default: 1, all)")
        p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one)")

    p = sub.add_parser("warm", help="quantize every layer of a model into the layer cache (resumable)")
    p.add_argument("model_dir", help="local Hugging Face model directory")
    engine(p, "int8", False)
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
            q.add_argument("model_id", metavar="MODEL_ID", help="a model id as `sli cache info` lists it")
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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the stream of the
    first call), so several ``main()`` calls in one process each reach their own stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(level: int) -> None:
    """sli's own loggers (``sli``, ``sli.*``) print their messages bare on stderr at ``level``."""
    sli_logger = logging.getLogger("sli")
    for handler in [h for h in sli_logger.handlers if isinstance(h, _StderrHandler)]:
        sli_logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    sli_logger.addHandler(handler)
    sli_logger.setLevel(level)
    sli_logger.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = None
    if "bench" in argv and all(a.startswith("-") for a in argv[:argv.index("bench")]):
        # argparse would take `sli bench --synth 7b` for sli's own (unknown) options
        cut = argv.index("bench") + 1
        argv, rest = argv[:cut], argv[cut:]
    try:
        args, extras = parser.parse_known_args(argv)
        if extras and getattr(args, "command", None) == "generate" and not any(e.startswith("-") for e in extras):
            args.words += extras  # `generate MODEL --mode int8 PROMPT`: argparse stops the positionals at an option
        elif extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exc:  # --help, --version, a usage error: a status, also when called in-process
        return exc.code if isinstance(exc.code, int) else 1
    if rest is not None:
        args.rest = rest[1:] if rest[:1] == ["--"] else rest
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    if args.quiet or not sys.stderr.isatty():
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return args.func(args)
    except (SLIError, ValueError, KeyError, OSError) as exc:
        if args.verbose:
            raise  # -v: the whole traceback, for a bug report
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"sli: error: {' '.join(str(message).split())}", file=sys.stderr)  # one line, always
        return 1
    except KeyboardInterrupt:
        print("sli: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
