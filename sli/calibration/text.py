"""The calibration text: the default one (from the standard library), a user's own recorded
in the config by its hash, and its windows of token ids."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from ..errors import SLIError
from ..quantization import QuantizationConfig
from ..quantization.config import DEFAULT_CALIBRATION

logger = logging.getLogger(__name__)


def default_calibration_text() -> str:
    """The second half of ``pydoc_data.topics`` (entries in key order, as :func:`sli.evaluation.load_eval_text`
    joins them): disjoint from the evaluation windows, which are the text's first tokens."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text[len(text) // 2:]


def calibration_id(text: str) -> str:
    """What a config records about a calibration text that is not the default: its hash."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def calibration_config(config: QuantizationConfig, text: Optional[str] = None, path: Optional[Union[str, Path]] = None,
                       tokens: Optional[int] = None, method: str = "gptq") -> QuantizationConfig:
    """``config`` made calibrated: ``method`` (default GPTQ), the text (``text`` or the file at
    ``path``; neither: the default text) recorded by its hash, and ``tokens`` of it."""
    if text is None and path is not None:
        text = Path(path).read_text(encoding="utf-8")
    changes: Dict[str, Any] = {"method": method if config.method == "rtn" else config.method}
    if text is not None:
        changes["calibration"] = calibration_id(text)
    if tokens is not None:
        changes["calibration_tokens"] = int(tokens)
        if int(tokens) < config.calibration_window:
            changes["calibration_window"] = int(tokens)
    return dataclasses.replace(config, **changes)


def calibration_settings(quantizer) -> QuantizationConfig:
    configs = [c for c in quantizer.configs() if c.calibrated]
    if not configs:
        raise SLIError("calibration needs a calibrated config: QuantizationConfig(mode='int4' or 'nf4', method='gptq')")
    first = configs[0]
    for other in configs[1:]:
        if (other.calibration, other.calibration_tokens, other.calibration_window) != (
                first.calibration, first.calibration_tokens, first.calibration_window):
            raise SLIError("the quantizer's calibrated configs name different calibration texts or sizes; use one")
    return first


def resolve_text(config: QuantizationConfig, text: Optional[str]) -> str:
    if text is None:
        if config.calibration != DEFAULT_CALIBRATION:
            raise SLIError(f"the config was calibrated on the text {config.calibration}; pass that text "
                           "(calibrate(processor, text) / --calibration-file)")
        return default_calibration_text()
    if config.calibration == DEFAULT_CALIBRATION:
        if text != default_calibration_text():
            raise SLIError("a calibration text was given but the config names the default one; make the config "
                           "with sli.calibration.calibration_config(config, text=...) so its fingerprint records it")
    elif calibration_id(text) != config.calibration:
        raise SLIError(f"the calibration text's hash {calibration_id(text)} is not the config's {config.calibration}")
    return text


def calibration_windows(tokenizer, config: QuantizationConfig, text: Optional[str] = None) -> torch.Tensor:
    """``[windows, calibration_window]`` token ids: the first ``calibration_tokens`` tokens of the
    calibration text (no special tokens, as :mod:`sli.evaluation` scores text), whole windows only."""
    text = resolve_text(config, text)
    window, wanted = int(config.calibration_window), int(config.calibration_tokens)
    count = wanted // window * window
    ids: List[int] = []
    chars = max(count * 8, 4096)
    while True:  # tokenize a prefix: a long text need not be tokenized whole
        part = text[:chars]
        ids = tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > count or len(part) == len(text):
            break
        chars *= 4
    usable = min(len(ids), count) // window * window
    if usable == 0:
        raise SLIError(f"the calibration text has {len(ids)} tokens, fewer than one window of {window}")
    if usable < count:
        logger.warning("the calibration text has %d tokens; calibrating on %d windows of %d, not %d",
                       len(ids), usable // window, window, count // window)
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, window)
