"""The CLI's shared pieces: option types that validate, the checks every command makes, the
processor a command opens, and output helpers."""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import SLIError

logger = logging.getLogger("sli")

DEFAULT_PROMPT = "What is the capital of France?"
MODES = "none, int8, int8_dynamic, nf4, fp4, int4, fp8"
# The demo's memory budget, GiB: above what the processor holds whatever the budget (for SmolLM2
# in int8: the 0.05 GiB embedding, 0.01 GiB of layers in flight, the 0.16 GiB kernel runtime and the
# KV of the run's few dozen positions; 0.22 GiB in all), so the plan has room and does not warn;
# below the checkpoint's 0.25 GiB (0.27 GB) of bf16 weights, so most of its 30 layers stream.
DEMO_BUDGET_GB = 0.24


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
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


def block_size(text: str) -> str:
    """``--block-size``: a size, then any linears' own (``32,q_proj=64``), checked here, passed on as text."""
    from ..quantization.config import parse_block_sizes

    try:
        parse_block_sizes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def unit_interval(text: str) -> float:
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (0 = off), got {text}")
    return value


def penalty(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (1 = off), got {text}")
    return value


def stop_string(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be a non-empty string")
    return text


def int_at_least(low: int):
    def parse(text: str) -> int:
        value = _finite(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def port_number(text: str) -> int:
    value = _finite(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {text}")
    return value


def device_name(text: str) -> str:
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def valid_modes() -> List[str]:
    from ..quantization import QuantizationMode
    from ..quantization.presets import calibrated_names

    return [m.value for m in QuantizationMode] + ["mixed"] + calibrated_names()


def check_mode(mode: str, option: str = "--mode") -> str:
    modes = valid_modes()
    if mode not in modes:
        raise SLIError(f"{option} {mode!r} is not a quantization mode; valid modes: {', '.join(modes)}")
    return mode


def check_device(device: Optional[str]) -> None:
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SLIError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    count = torch.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= count:
        raise SLIError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def checked_model_dir(path: Path) -> "tuple[Path, dict]":
    """``path`` and its config, when it is a local decoder-only causal LM; else a one-line error."""
    from ..errors import ModelLoadError
    from ..model_check import check_causal_lm

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a directory; pass the folder holding config.json and the weights")
    return path, check_causal_lm(path)


def config_for(mode: str):
    from ..quantization import QuantizationConfig, QuantizationRegistry, get_mixed_precision_config

    if mode == "mixed":
        return get_mixed_precision_config()
    try:
        return QuantizationRegistry.get(mode)
    except KeyError:
        return QuantizationConfig(mode=mode)  # raises ValueError listing the modes


def quantization_config_of(args, positions: Optional[int] = None):
    """The quantization ``--mode`` names, made calibrated by ``--calibrate`` (sli warm) and set to
    ``--calibration-file`` / ``--calibration-tokens`` / ``--asymmetric`` where it is calibrated; its calibration
    windows no longer than the model's ``positions``; its head as ``--head`` says."""
    import dataclasses

    from ..quantization import QuantizationConfig

    config = _block_size_option(_mode_config(args, positions), getattr(args, "block_size", None), f"--mode {args.mode}")
    head = getattr(args, "head", None)
    if head in (None, "auto"):
        return config
    if isinstance(config, QuantizationConfig):
        return dataclasses.replace(config, head=head)
    config.config = dataclasses.replace(config.config, head=head)  # a quantizer (mixed): its base config
    return config


def _block_size_option(config, size: Optional[str], named: str):
    """``config`` with NF4/FP4 blocks or INT4 groups as ``size`` says (``--block-size``: "32,q_proj=64";
    None: as it is). An error names the modes it applies to where ``config`` has neither
    (``named``: how the user named it), or the sizes its mode takes."""
    from ..quantization.quantizer import with_block_size

    if size is None:
        return config
    try:
        found = with_block_size(config, size)
    except ValueError as error:  # a size the mode does not take (NF4/FP4 blocks: powers of two)
        raise SLIError(f"--block-size {size}: {error}") from None
    if found is None:
        raise SLIError(f"--block-size applies to NF4/FP4 blocks and INT4 groups, and {named} has neither; use --mode "
                       "nf4, fp4, int4, nf4-gptq, fp4-gptq, int4-gptq or mixed")
    return found


def _mode_config(args, positions: Optional[int] = None):
    import dataclasses

    from ..calibration import calibration_config
    from ..quantization import QuantizationConfig
    from ..quantization.presets import calibrated_names

    config = config_for(args.mode)
    path, tokens = getattr(args, "calibration_file", None), getattr(args, "calibration_tokens", None)
    asymmetric = getattr(args, "asymmetric", None)
    calibrated = isinstance(config, QuantizationConfig) and config.calibrated
    if getattr(args, "calibrate", False) and not calibrated:
        if f"{args.mode}-gptq" not in calibrated_names():
            raise SLIError(f"--calibrate: mode {args.mode!r} has no calibrated method; use --mode "
                           f"{' or '.join(n.split('-')[0] for n in calibrated_names())}")
        calibrated = True
    if not calibrated:
        if path is not None or tokens is not None or asymmetric is not None:
            raise SLIError("--calibration-file, --calibration-tokens and --asymmetric apply to calibrated modes: add "
                           f"--calibrate (sli warm) or use --mode {' / '.join(calibrated_names())}")
        return config
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise SLIError(f"--calibration-file {str(path)!r} is not a file; pass a UTF-8 text file")
    if positions and config.calibration_window > positions:
        config = dataclasses.replace(config, calibration_window=int(positions))
    if asymmetric is not None:
        config = dataclasses.replace(config, gptq_asymmetric=asymmetric)
    try:
        return calibration_config(config, path=path, tokens=tokens)
    except UnicodeDecodeError as exc:
        raise SLIError(f"--calibration-file {str(path)!r} is not UTF-8 text ({exc.reason})") from None


def calibration_text_of(args) -> Optional[Path]:
    """The file ``--calibration-file`` names (None: the default calibration text)."""
    path = getattr(args, "calibration_file", None)
    return Path(path).expanduser() if path is not None else None


def progress_bars(args) -> bool:
    """Progress bars: only on a terminal, and not with -q. Turns transformers' own bars (loading,
    saving shards) off otherwise; sli's are passed the answer."""
    shown = not args.quiet and sys.stderr.isatty()
    if not shown:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return shown


def model_dir_of(args) -> Path:
    if getattr(args, "model_dir", None):
        return Path(args.model_dir).expanduser()
    from ..default_model import ensure_default_model

    return ensure_default_model(progress=not args.quiet)


def open_processor(args, model_dir: Path, **kwargs):
    from ..model_check import max_positions
    from ..processor import UniversalSLIProcessor

    check_mode(args.mode)
    check_device(args.device)
    model_dir, hf_config = checked_model_dir(model_dir)
    positions = max_positions(hf_config)
    return UniversalSLIProcessor(model_dir, quantization_config_of(args, positions), cache_dir=args.cache_dir, device=args.device,
                                 max_cache_size_gb=args.max_cache_size_gb,
                                 memory_budget_gb=getattr(args, "memory_budget_gb", None),
                                 max_gpu_memory_gb=getattr(args, "memory_budget_gb", None), **kwargs)




def emit(args, data: dict, line: str) -> None:
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

