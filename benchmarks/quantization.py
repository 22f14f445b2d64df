"""Codec benchmark: 4096x4096 bf16 N(0, 0.02) weight, every mode beside bitsandbytes' 4-bit.

Run: .venv/bin/python benchmarks/quantization.py [--size 4096] [--repeats 3]
Prints a markdown table: bits/weight, SNR dB, quantize / dequantize (to fp32) MB/s of 16-bit input.
"""
import argparse
import time

import torch

from sli.codecs import bits_per_weight, calculate_quantization_error, codec_for
from sli.quantization import QuantizationConfig


def best(fn, repeats):
    fn()  # warm-up (torch.compile, caches)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    w = (torch.randn(args.size, args.size) * 0.02).to(torch.bfloat16)
    mb = w.numel() * 2 / 1e6
    rows, ref = [], {}
    try:
        import bitsandbytes.functional as F

        for qt in ("nf4", "fp4"):
            packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt)
            tq = best(lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt), args.repeats)
            st.dtype = torch.float32
            td = best(lambda: F.dequantize_4bit(packed, st), args.repeats)
            nbytes = packed.numel() + st.absmax.numel() + 4 * (st.state2.absmax.numel() + 256 + 16)
            snr = calculate_quantization_error(w, F.dequantize_4bit(packed, st))["snr_db"]
            ref[qt] = (tq, td)
            rows.append((f"bitsandbytes {qt} (dq)", 8 * nbytes / w.numel(), snr, mb / tq, mb / td, "1.00x", "1.00x"))
    except ImportError:
        pass
    for mode in ("int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"):
        codec = codec_for(mode)
        cfg = QuantizationConfig(mode=mode)
        q = codec.quantize(w, cfg)
        tq = best(lambda: codec.quantize(w, cfg), args.repeats)
        out = torch.empty(w.shape, dtype=torch.float32)
        td = best(lambda: codec.dequantize(q, torch.float32, out=out), args.repeats)
        snr = calculate_quantization_error(w, codec.dequantize(q, torch.float32))["snr_db"]
        rq = rd = "-"
        if mode in ref:
            rq, rd = f"{ref[mode][0] / tq:.2f}x", f"{ref[mode][1] / td:.2f}x"
        rows.append((f"sli {mode}", bits_per_weight(q), snr, mb / tq, mb / td, rq, rd))
    print(f"weight {args.size}x{args.size} bf16 N(0, 0.02); torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| codec | bits/weight | SNR dB | quantize MB/s | dequantize→fp32 MB/s | quantize vs bnb | dequantize vs bnb |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]} | {r[6]} |")


if __name__ == "__main__":
    main()
