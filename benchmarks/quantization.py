"""Codec benchmark: a 4096x4096 bf16 N(0, 0.02) weight through every mode, beside bitsandbytes.

Run: .venv/bin/python benchmarks/quantization.py [--size 4096] [--repeats 3]

Prints a markdown table: bits/weight, SNR dB, quantize and dequantize (to fp32) throughput in
MB/s of 16-bit input, and ratios against bitsandbytes measured in the same run:
``quantize_4bit``/``dequantize_4bit`` (nf4, fp4, double quant) and ``int8_vectorwise_quant``/
``int8_vectorwise_dequant`` (for int8). Times are the best of ``--repeats`` after one warm-up
call (which includes torch.compile of the 4-bit quantizer; its cost is printed separately).
Also checks that sli's nf4/fp4 bytes equal bitsandbytes'.
"""
import argparse
import platform
import time

import torch

from sli.quantization import QuantizationConfig, bits_per_weight, calculate_quantization_error, codec_for
from sli.quantization.codecs import four_bit_quantizer


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="the weight is size x size")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best is kept)")
    args = ap.parse_args()
    torch.manual_seed(0)
    w = (torch.randn(args.size, args.size) * 0.02).to(torch.bfloat16)
    mb = w.numel() * 2 / 1e6  # MB of 16-bit input
    rows, ref, notes = [], {}, []

    import bitsandbytes
    import bitsandbytes.functional as F

    for qt in ("nf4", "fp4"):
        packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt)
        tq = best(lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt), args.repeats)
        st.dtype = torch.float32
        F.dequantize_4bit(packed, st)
        td = best(lambda: F.dequantize_4bit(packed, st), args.repeats)
        nbytes = packed.numel() + st.absmax.numel() + 4 * (st.state2.absmax.numel() + 256 + 16) + 4
        snr = calculate_quantization_error(w, F.dequantize_4bit(packed, st))["snr_db"]
        ref[qt] = (tq, td, packed, st)
        rows.append((f"bitsandbytes {qt} (double quant)", 8 * nbytes / w.numel(), snr, mb / tq, mb / td, "", ""))
    w16 = w.to(torch.float16)  # int8_vectorwise_quant's documented input dtype
    i8, scb, _ = F.int8_vectorwise_quant(w16.clone(), threshold=6.0)
    tq = best(lambda: F.int8_vectorwise_quant(w16.clone(), threshold=6.0), args.repeats)
    tq -= best(lambda: w16.clone(), args.repeats)  # it zeroes outliers in place: time the clone apart
    td = best(lambda: F.int8_vectorwise_dequant(i8, scb), args.repeats)
    snr = calculate_quantization_error(w, F.int8_vectorwise_dequant(i8, scb))["snr_db"]
    ref["int8"] = (tq, td)
    rows.append(("bitsandbytes int8 (vectorwise)", 8 * (i8.numel() + 4 * scb.numel()) / w.numel(), snr,
                 mb / tq, mb / td, "", ""))

    for mode in ("int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"):
        codec = codec_for(mode)
        cfg = QuantizationConfig(mode=mode)
        t0 = time.perf_counter()
        q = codec.quantize(w, cfg)  # warm-up: torch.compile for nf4/fp4 (cached on disk afterwards)
        if mode in ("nf4", "fp4"):
            notes.append(f"{mode}: first quantize call (torch.compile warm-up) {time.perf_counter() - t0:.1f} s")
            _, _, packed, st = ref[mode]
            same = (torch.equal(q.tensors["weight"], packed) and torch.equal(q.tensors["weight.absmax"], st.absmax)
                    and torch.equal(q.tensors["weight.nested_absmax"], st.state2.absmax))
            notes.append(f"{mode}: bytes equal bitsandbytes' quantize_4bit: {same}")
        tq = best(lambda: codec.quantize(w, cfg), args.repeats)
        codec.dequantize(q, torch.float32)
        td = best(lambda: codec.dequantize(q, torch.float32), args.repeats)
        snr = calculate_quantization_error(w, codec.dequantize(q, torch.float32))["snr_db"]
        rq = rd = "-"
        key = "int8" if mode == "int8" else mode
        if key in ref:
            rq, rd = f"{ref[key][0] / tq:.2f}x", f"{ref[key][1] / td:.2f}x"
        rows.append((f"sli {mode}", bits_per_weight(q), snr, mb / tq, mb / td, rq, rd))

    out = torch.empty(w.shape, dtype=torch.float32)
    for mode in ("int8", "nf4", "int4", "fp8"):
        codec = codec_for(mode)
        q = codec.quantize(w, QuantizationConfig(mode=mode))
        codec.dequantize(q, torch.float32, out=out)
        td = best(lambda: codec.dequantize(q, torch.float32, out=out), args.repeats)
        notes.append(f"{mode}: dequantize into a reused out= buffer {mb / td:.0f} MB/s")

    print(f"weight {args.size}x{args.size} bf16 N(0, 0.02); torch {torch.__version__}, bitsandbytes "
          f"{bitsandbytes.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"compiled 4-bit quantizer: {not four_bit_quantizer._compile_failed}\n")
    print("| codec | bits/weight | SNR dB | quantize MB/s | dequantize→fp32 MB/s | quantize vs bnb | dequantize vs bnb |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]} | {r[6]} |")
    print()
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
