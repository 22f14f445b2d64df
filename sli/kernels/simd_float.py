"""The SIMD helpers that meet float32 activations: 4-bit table lookups (``lut4``, ``lut4z``),
the widening dot products of int8, float8 and bfloat16 rows (``dot8``, ``dotfp8``,
``dotbf16``) and the 4-bit decode for dequantizing (``decode64_4bit``). Their arguments are
listed in :mod:`sli.kernels.simd`.

Every value meets ``x`` through one float32 multiply-add, and each 4-bit value is the
float32 product ``code * scale`` that dequantizing writes, so results equal
dequantize-then-``F.linear`` to float32 rounding (only the order of the sums differs).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .jit import stable_id
from .plain import WEIGHT_ROWS
from .simd_ir import (I8, I16, I32, PREFETCH_VALUES, WIDTH, Emit, const, half_to_float, idx, row_pass, splat, unpack,
                      vload, vstore, weight_rows_pass)


def make_lut4(level: str, kind: str):
    """``lut4`` (kind "scale") or ``lut4z`` ("affine": a zero point too)."""
    extra = {"scale": 1, "affine": 2}[kind]  # arguments between code and sofs

    # One signature per kind, spelled out: numba lowers an intrinsic's *args as a tuple.
    if kind == "affine":
        def lut4(typingctx, packed, pofs, code, scales, zeros, sofs, blocksize, x, xofs, n, stride, rows, out):
            return types.void(packed, pofs, code, scales, zeros, sofs, blocksize, x, xofs, n, stride, rows, out), codegen
    else:
        def lut4(typingctx, packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out):
            return types.void(packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out), codegen

    def codegen(context, builder, signature, args):
        b = builder
        values = unpack(context, b, signature, args)
        packed_ptr, pofs_i, code_ptr, scales_ptr = values[:4]
        if kind == "affine":
            zeros_ptr = values[4]
        sofs_i, bs_i, x_ptr, xofs_i, n_i, stride_i, rows_i, out_ptr = values[3 + extra:]
        slots = []

        def begin_block(e, index):  # the block's table: code * scale (or (code - zero) * scale)
            if not slots:
                slots.extend(cgutils.alloca_once(b, e.vf) for _ in range(16 // e.w))
            at_block = b.add(sofs_i, index)
            scale = b.load(b.gep(scales_ptr, [at_block]))
            if kind == "affine":  # INT4's scale as stored (float16 bits), its zero a byte
                scale = half_to_float(b, scale)
            scale = splat(b, scale, e.vf)
            code = e.table(code_ptr)
            if kind == "affine":
                zero = splat(b, b.uitofp(b.load(b.gep(zeros_ptr, [at_block])), ir.FloatType()), e.vf)
                table = e.map_table(code, lambda part: b.fmul(b.fsub(part, zero), scale))
            else:
                table = e.map_table(code, lambda part: b.fmul(part, scale))
            for slot, part in zip(slots, table):
                b.store(part, slot)

        def body(e, unit, multiply):
            table = tuple(b.load(slot) for slot in slots)
            w = e.w
            e.prefetch(packed_ptr, b.add(b.add(pofs_i, b.lshr(unit, idx(1))), idx(PREFETCH_VALUES // 2)))
            for chunk in range(64 // (2 * w)):  # 2w values from w bytes
                raw = vload(b, packed_ptr, b.add(pofs_i, b.add(b.lshr(unit, idx(1)), idx(chunk * w))),
                            ir.VectorType(I8, w))
                index = b.zext(raw, e.vi)  # the low nibble is the index's low 4 bits
                high = b.lshr(index, const(e.vi, 4))
                xoffset = b.add(unit, idx(chunk * 2 * w))
                multiply(e.lookup(table, high), xoffset)
                multiply(e.lookup(table, index), b.add(xoffset, idx(w)))

        row_pass(b, level, n_i, bs_i, x_ptr, xofs_i, stride_i, rows_i, out_ptr, begin_block, body)
        return context.get_dummy_value()

    lut4.__name__ = f"lut4{dict(scale='', affine='z')[kind]}_{level}"
    return stable_id(intrinsic(lut4), f"simd.{lut4.__name__}")


def _e4m3(b, e, byte):
    """float8_e4m3fn bytes (zero-extended to i32 lanes) as float32, exactly: a normal value's
    exponent and mantissa move into place and the bias grows by 120; a subnormal (exponent
    0) is its mantissa times 2**-9; 0x7f and 0xff are NaN."""
    magnitude = b.and_(byte, const(e.vi, 0x7F))
    normal = b.add(b.shl(magnitude, const(e.vi, 20)), const(e.vi, 120 << 23))
    subnormal = b.bitcast(b.fmul(b.sitofp(magnitude, e.vf), const(e.vf, 2.0 ** -9)), e.vi)
    bits = b.select(b.icmp_unsigned("<", magnitude, const(e.vi, 8)), subnormal, normal)
    bits = b.or_(bits, b.shl(b.and_(byte, const(e.vi, 0x80)), const(e.vi, 24)))
    value = b.bitcast(bits, e.vf)
    return b.select(b.icmp_unsigned("==", magnitude, const(e.vi, 0x7F)), const(e.vf, float("nan")), value)


def _widening_step(b, level, kind, w_ptr, wofs):
    """``body(e, unit, multiply)``: one 64-value step of an int8, float8 or bfloat16 weight
    row at ``w_ptr[wofs:]``, each register of values widened to float32."""
    w = WIDTH[level]

    def body(e, unit, multiply):
        e.prefetch(w_ptr, b.add(b.add(wofs, unit), idx(PREFETCH_VALUES)))
        for part in range(64 // w):
            at_value = b.add(unit, idx(part * w))
            if kind == "int8":
                raw = vload(b, w_ptr, b.add(wofs, at_value), ir.VectorType(I8, w))
                values = b.sitofp(b.sext(raw, e.vi), e.vf)
            elif kind == "fp8":
                raw = vload(b, w_ptr, b.add(wofs, at_value), ir.VectorType(I8, w))
                values = _e4m3(b, e, b.zext(raw, e.vi))
            else:
                raw = vload(b, w_ptr, b.add(wofs, at_value), ir.VectorType(I16, w))
                values = b.bitcast(b.shl(b.zext(raw, e.vi), const(e.vi, 16)), e.vf)
            multiply(values, at_value)

    return body


_SHORT = dict(int8="8", fp8="fp8", bf16="bf16")


def make_widening_dot(level: str, kind: str):
    """``dot8`` (int8 weights), ``dotfp8`` (float8_e4m3fn bytes) or ``dotbf16`` (bfloat16
    bits): natural order, no table."""
    def dot(typingctx, weights, wofs, x, xofs, n, stride, rows, out):
        sig = types.void(weights, wofs, x, xofs, n, stride, rows, out)

        def codegen(context, builder, signature, args):
            b = builder
            w_ptr, wofs_i, x_ptr, xofs_i, n_i, stride_i, rows_i, out_ptr = unpack(context, b, signature, args)
            row_pass(b, level, n_i, idx(64), x_ptr, xofs_i, stride_i, rows_i, out_ptr, lambda e, index: None,
                     _widening_step(b, level, kind, w_ptr, wofs_i))
            return context.get_dummy_value()

        return sig, codegen

    dot.__name__ = f"dot{_SHORT[kind]}_{level}"
    return stable_id(intrinsic(dot), f"simd.{dot.__name__}")


def make_widening_dot_rows(level: str, kind: str):
    """``dot8_rows``/``dotfp8_rows``/``dotbf16_rows(weights, wofs, wstride, x, xofs, n, out)``:
    :data:`WEIGHT_ROWS` weight rows ``weights[wofs + v * wstride:]`` by one activation row,
    ``out[v]`` what the one-row helper gives row ``v``, bit for bit
    (:func:`sli.kernels.simd_ir.weight_rows_pass`)."""
    def dot_rows(typingctx, weights, wofs, wstride, x, xofs, n, out):
        sig = types.void(weights, wofs, wstride, x, xofs, n, out)

        def codegen(context, builder, signature, args):
            b = builder
            w_ptr, wofs_i, wstride_i, x_ptr, xofs_i, n_i, out_ptr = unpack(context, b, signature, args)
            steps = [_widening_step(b, level, kind, w_ptr, b.add(wofs_i, b.mul(wstride_i, idx(v))))
                     for v in range(WEIGHT_ROWS)]
            weight_rows_pass(b, level, n_i, x_ptr, xofs_i, WEIGHT_ROWS, out_ptr,
                             lambda e, unit, multiply, v: steps[v](e, unit, multiply))
            return context.get_dummy_value()

        return sig, codegen

    dot_rows.__name__ = f"dot{_SHORT[kind]}_rows_{level}"
    return stable_id(intrinsic(dot_rows), f"simd.{dot_rows.__name__}")


def make_decode64(level: str):
    """``decode64_4bit``: 64 values of a 4-bit row, ``code[nibble] * scale``, in the weight's order."""
    w = WIDTH[level]

    def decode64_4bit(typingctx, packed, pofs, code, scale, out, oofs):
        sig = types.void(packed, pofs, code, scale, out, oofs)

        def codegen(context, builder, signature, args):
            b = builder
            packed_ptr, pofs_i, code_ptr, scale, out_ptr, oofs_i = unpack(context, b, signature, args, floats=(3,))
            e = Emit(b, level)
            scale = splat(b, scale, e.vf)
            table = e.map_table(e.table(code_ptr), lambda part: b.fmul(part, scale))
            v32 = ir.VectorType(I8, 32)
            raw = vload(b, packed_ptr, pofs_i, v32)
            high = b.lshr(raw, ir.Constant(v32, [4] * 32))
            low = b.and_(raw, ir.Constant(v32, [15] * 32))
            interleave = [i for k in range(32) for i in (k, 32 + k)]
            nibbles = b.shuffle_vector(high, low, ir.Constant(ir.VectorType(I32, 64), interleave))
            out_ptr = b.gep(out_ptr, [oofs_i])
            undef = ir.Constant(ir.VectorType(I8, 64), None)
            for group in range(64 // w):
                pick = ir.Constant(ir.VectorType(I32, w), list(range(w * group, w * group + w)))
                index = b.zext(b.shuffle_vector(nibbles, undef, pick), e.vi)
                vstore(b, e.lookup(table, index), out_ptr, idx(w * group))
            return context.get_dummy_value()

        return sig, codegen

    decode64_4bit.__name__ = f"decode64_4bit_{level}"
    return stable_id(intrinsic(decode64_4bit), f"simd.{decode64_4bit.__name__}")


def make_half_value(level: str):
    """``half_value(bits)``: the float32 value of the float16 whose bits are ``bits`` (an int16
    or uint16), exact: one ``vcvtph2ps`` (F16C, which every level needs) where
    :func:`sli.kernels.plain.half_value` takes integer operations and two branches. INT4's kernel
    reads a kept value's group scale with it, four times a weight row in a token's product."""
    def half_value(typingctx, bits):
        if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
            return None
        sig = types.float32(bits)

        def codegen(context, builder, signature, args):
            return half_to_float(builder, args[0])

        return sig, codegen

    half_value.__name__ = f"half_value_{level}"
    return stable_id(intrinsic(half_value), f"simd.{half_value.__name__}")
