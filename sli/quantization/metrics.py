"""How far a quantized weight is from the original: error figures and bits per weight."""
from __future__ import annotations

import math
from typing import Dict

from torch import Tensor

from .formats import QuantizedTensor


def calculate_quantization_error(original: Tensor, dequantized: Tensor) -> Dict[str, float]:
    """Error figures of a round trip: max/mean absolute error, relative error (%) and SNR (dB).

    ``relative_error_pct`` is ``100 * ||err||_1 / ||w||_1``; ``snr_db`` is
    ``10 * log10(sum w^2 / sum err^2)`` (``inf`` for a lossless round trip).
    """
    w = original.detach().double().reshape(-1)
    err = dequantized.detach().double().reshape(-1).to(w.device) - w
    abs_err = err.abs()
    signal = float((w * w).sum())
    noise = float((err * err).sum())
    w_l1 = float(w.abs().sum())
    snr = float("inf") if noise == 0 else (10.0 * math.log10(signal / noise) if signal > 0 else float("-inf"))
    return {
        "max_abs_error": float(abs_err.max()) if abs_err.numel() else 0.0,
        "mean_abs_error": float(abs_err.mean()) if abs_err.numel() else 0.0,
        "relative_error_pct": 100.0 * float(abs_err.sum()) / w_l1 if w_l1 > 0 else (0.0 if noise == 0 else float("inf")),
        "snr_db": snr,
    }


def bits_per_weight(q: QuantizedTensor) -> float:
    """Stored bits per original weight value (all codec tensors counted)."""
    return 8.0 * q.nbytes / max(math.prod(int(s) for s in q.metadata["shape"]), 1)
