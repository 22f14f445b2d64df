"""The commands that run a model: warm, generate, demo, chat, eval, and the small ones (synth,
import-gguf, bench)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

from ..errors import SLIError
from .options import (DEFAULT_PROMPT, calibration_text_of, check_device, check_mode, checked_model_dir, emit, logger,
                      model_dir_of, open_processor, peak_rss_mb, progress_bars, reset_peak_rss, valid_modes)


def cmd_warm(args) -> int:
    progress_bars(args)
    proc = open_processor(args, model_dir_of(args))
    t0 = time.perf_counter()
    added = proc.prewarm(progress=progress_bars(args), calibration=calibration_text_of(args))
    stats = proc.cache.stats().to_dict()
    result = {"model_id": proc.model_id, "layers": proc.layout.num_layers, "added": added,
              "seconds": round(time.perf_counter() - t0, 2), "cache": stats}
    emit(args, result, f"warmed {proc.model_id}: {added} new of {proc.layout.num_layers} layers in "
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
    from ..stopping import end_token_ids

    return end_token_ids(proc.model_dir, proc.config, tok)


def cmd_generate(args) -> int:
    import torch

    from ..chat_template import encode_prompt

    from ..model_check import load_tokenizer, max_positions
    from ..stopping import StopStrings

    model, prompt_text = _generate_inputs(args)
    check_mode(args.mode)
    check_device(args.device)
    progress_bars(args)
    args.model_dir = model
    model_dir, config = checked_model_dir(model_dir_of(args))
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
    proc = open_processor(args, model_dir, max_context_tokens=len(prompt.ids) + max_new_tokens)
    proc.plan  # made (and logged once, by the processor) before the warm-up, as the first thing said
    warm_t0 = time.perf_counter()
    proc.prewarm(progress=progress_bars(args), calibration=calibration_text_of(args))
    warm_s = time.perf_counter() - warm_t0
    printed: List[int] = []
    answer = StopStrings(args.stop)  # cut before a stop string; never prints one's start before it is resolved

    def on_token(token):
        printed.append(int(token[0]))
        piece = answer.update(tok.decode(printed, skip_special_tokens=True))
        if piece and not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    if not args.json and not prompt.templated:
        sys.stdout.write(prompt_text)  # a completion continues the text; a chat answer stands alone
        sys.stdout.flush()
    reset_peak_rss()  # conversion and warm-up are not part of the generation's peak
    t0 = time.perf_counter()
    first_token_at = []
    eos = _stop_ids(proc, tok)
    new = proc.generate(torch.tensor([prompt.ids], dtype=torch.long), max_new_tokens=max_new_tokens,
                        do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        eos_token_id=eos, should_stop=lambda: answer.stopped,
                        callback=lambda t: (first_token_at.append(time.perf_counter()) if not first_token_at else None,
                                            on_token(t)), seed=args.seed)
    total = time.perf_counter() - t0
    rest = answer.flush()  # held back as the possible start of a stop string that never came
    if rest and not args.json:
        sys.stdout.write(rest)
    n = new.shape[1]
    prefill = (first_token_at[0] - t0) if first_token_at else total
    decode_tps = (n - 1) / (total - prefill) if n > 1 and total > prefill else 0.0
    stats = proc.cache.stats().to_dict()
    result = {"model_id": proc.model_id, "mode": args.mode, "prompt": prompt_text, "chat_template": prompt.templated,
              "prompt_tokens": len(prompt.ids), "text": answer.text, "new_tokens": n,
              "finish_reason": "stop" if answer.stopped or (n and int(new[0, -1]) in eos) else "length",
              "stop": answer.matched, "prefill_s": round(prefill, 3), "decode_tokens_per_s": round(decode_tps, 2),
              "warm_s": round(warm_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
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



def cmd_eval(args) -> int:
    from ..evaluation import check_block_size, evaluate_modes, format_report, takes_block_size

    from ..model_check import max_positions

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise SLIError(f"--modes {args.modes!r} names no mode; valid modes: {', '.join(valid_modes())}")
    for m in modes:
        check_mode(m, "--modes: mode")
    progress_bars(args)
    model_dir, config = checked_model_dir(model_dir_of(args))
    window = args.window
    limit = max_positions(config)
    if limit is not None and window > limit:
        logger.info("windows of %d tokens: the model has %d positions (--window %d)", limit, limit, window)
        window = limit
    fields = None
    if args.asymmetric is not None:
        from ..evaluation import CALIBRATED_MODES

        if not any(m in CALIBRATED_MODES for m in modes):
            raise SLIError(f"--asymmetric applies to calibrated modes, and --modes {args.modes!r} names none; "
                           "add int4-gptq or nf4-gptq")
        fields = {"gptq_asymmetric": args.asymmetric}
    if args.block_size is not None and not any(takes_block_size(m) for m in modes):
        raise SLIError(f"--block-size applies to NF4/FP4 blocks and INT4 groups, and --modes {args.modes!r} names no "
                       "such mode; add nf4, fp4, int4, nf4-gptq, fp4-gptq, int4-gptq or mixed")
    for mode in modes if args.block_size is not None else ():
        try:
            check_block_size(mode, args.block_size)
        except ValueError as error:
            raise SLIError(f"--block-size {args.block_size} for {mode}: {error}") from None
    report = evaluate_modes(model_dir, modes, text_path=args.text, num_windows=args.windows,
                            window=window, progress=not args.quiet, calibration=fields, block_size=args.block_size)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_synth(args) -> int:
    import torch

    progress_bars(args)
    from ..synth import synth_model

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    path = synth_model(args.out_dir, family=args.family, preset=args.preset, num_layers=args.layers, dtype=dtype,
                       seed=args.seed, with_tokenizer=args.tokenizer)
    emit(args, {"model_dir": str(path)}, f"wrote {path}")
    return 0


def cmd_import_gguf(args) -> int:
    from ..default_model import import_gguf

    progress_bars(args)
    path = import_gguf(Path(args.gguf_file), Path(args.out_dir), force=args.force)
    emit(args, {"model_dir": str(path)}, f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "streaming.py"  # sli/cli/commands.py
    if not script.is_file():
        raise SLIError(f"{script} is missing: `sli bench` runs the repository's benchmarks/streaming.py; run it from a source checkout")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_chat(args) -> int:
    """A conversation in the terminal with the default model or MODEL (its chat template)."""
    from ..chat import Conversation, run_chat

    check_mode(args.mode)
    check_device(args.device)
    progress_bars(args)
    model_dir, _ = checked_model_dir(model_dir_of(args))
    proc = open_processor(args, model_dir)
    proc.prewarm(progress=progress_bars(args), calibration=calibration_text_of(args))
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    conversation = Conversation(proc, system=args.system, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                stop=args.stop or ())
    try:
        return run_chat(conversation)
    finally:
        proc.close()


def cmd_demo(args) -> int:
    """Convert the default model once, warm its cache, stream it under a small budget."""
    args.words, args.model, args.prompt_file = [args.prompt], None, None
    args.system, args.raw = None, False
    return cmd_generate(args)


def cmd_serve(args) -> int:
    """An OpenAI-compatible server over the streamed model (sli/server.py); Ctrl-C stops it."""
    import os

    from ..server import serve
    from ..settings import GB

    progress_bars(args)
    model_dir, _ = checked_model_dir(model_dir_of(args))
    api_key = args.api_key or os.environ.get("SLI_API_KEY") or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it "
                       "(--api-key or $SLI_API_KEY)", args.host)
    proc = open_processor(args, model_dir)
    proc.plan  # made (and logged once, by the processor) before the warm-up
    proc.prewarm(progress=progress_bars(args), calibration=calibration_text_of(args))
    name = args.model_name or model_dir.name
    if args.json:
        print(json.dumps({"url": f"http://{args.host}:{args.port}/v1", "model": name, "model_id": proc.model_id,
                          "max_batch_size": args.max_batch_size, "max_queue": args.max_queue}), flush=True)
    try:
        serve(proc, host=args.host, port=args.port, model_name=name, api_key=api_key,
              max_batch_size=args.max_batch_size, max_queue=args.max_queue,
              kv_budget_bytes=int(args.kv_budget_gb * GB) if args.kv_budget_gb else None,
              log_level="warning" if args.quiet else "info")
    except KeyboardInterrupt:  # Ctrl-C is how a server stops (uvicorn before 0.3x re-raises it after shutting down)
        pass
    finally:
        proc.close()
    return 0
