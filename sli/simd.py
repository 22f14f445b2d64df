"""AVX2 building blocks for the 4-bit kernels in :mod:`sli.kernels`.

A 4-bit weight value is ``code[nibble]``, a lookup in a 16-entry table. Written as plain
numba code that lookup stays scalar (LLVM does not vectorize it here: 2–3 instructions per
value), and it bounds the whole kernel. AVX2 has the instruction it needs: ``vpermps``
picks 8 floats out of an 8-entry register table by 8 indices at once. Two of them (table
halves 0–7 and 8–15) and a blend on the index's top bit decode 8 values in ~4 instructions.

numba cannot express that, so the two helpers here are numba intrinsics that write the LLVM
IR directly, through llvmlite. Callers use them like functions inside ``@njit`` code:

- ``dot64_4bit(packed, pofs, x, xofs, code)`` → float32: the dot product of the 64 values
  packed in ``packed[pofs:pofs+32]`` (high nibble first) with ``x[xofs:xofs+64]``;
- ``decode64_4bit(packed, pofs, code, scale, out, oofs)``: ``out[oofs:oofs+64] = code[nibbles] * scale``.

All arrays are 1-D and contiguous (``code`` float32 with 16 entries, ``x``/``out``
float32, ``packed`` uint8). This module reaches into numba's and llvmlite's internals
(``numba.core.cgutils``, LLVM IR): :mod:`sli.kernels` imports it inside a guard and uses
:mod:`sli.simd_fallback`'s plain numba functions (same names, same results) when it cannot be
built, when the CPU lacks AVX2, or with ``SLI_NO_SIMD=1``.
"""
from __future__ import annotations

import os

from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic


def _use_avx2() -> bool:
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return False  # numba compiles for another (e.g. generic) CPU: it may lack AVX2
    features = binding.get_host_cpu_features()
    return bool(features.get("avx2")) and bool(features.get("fma"))


ENABLED = _use_avx2()

_f32, _i32, _i8, _i64 = ir.FloatType(), ir.IntType(32), ir.IntType(8), ir.IntType(64)
_v8f, _v8i = ir.VectorType(_f32, 8), ir.VectorType(_i32, 8)


def _data(context, builder, array_type, value):
    return context.make_array(array_type)(context, builder, value).data


def _offset(context, builder, value, value_type):
    return context.cast(builder, value, value_type, types.intp)


def _load(builder, pointer, index: ir.Value, vector_type):
    return builder.load(builder.bitcast(builder.gep(pointer, [index]), vector_type.as_pointer()), align=1)


def _decode(builder, packed_ptr, pofs, code_ptr):
    """The 64 values of 32 packed bytes as eight <8 x float>, in order (high nibble first)."""
    permps = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v8f, [_v8f, _v8i]),
                                            "llvm.x86.avx2.permps")
    table_low = _load(builder, code_ptr, ir.Constant(_i64, 0), _v8f)
    table_high = _load(builder, code_ptr, ir.Constant(_i64, 8), _v8f)
    v32 = ir.VectorType(_i8, 32)
    raw = _load(builder, packed_ptr, pofs, v32)
    high = builder.lshr(raw, ir.Constant(v32, [4] * 32))
    low = builder.and_(raw, ir.Constant(v32, [15] * 32))
    interleave = [i for k in range(32) for i in (k, 32 + k)]
    nibbles = builder.shuffle_vector(high, low, ir.Constant(ir.VectorType(_i32, 64), interleave))
    seven = ir.Constant(_v8i, [7] * 8)
    undef = ir.Constant(ir.VectorType(_i8, 64), None)
    values = []
    for group in range(8):
        index = builder.zext(builder.shuffle_vector(nibbles, undef, ir.Constant(_v8i, list(range(8 * group, 8 * group + 8)))),
                             _v8i)
        from_low = builder.call(permps, [table_low, index])  # permps reads the index's low 3 bits
        from_high = builder.call(permps, [table_high, index])
        values.append(builder.select(builder.icmp_unsigned(">", index, seven), from_high, from_low))
    return values


def _horizontal_sum(builder, vector):
    def half(v, lanes, first):
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, lanes), list(range(first, first + lanes))))
    four = builder.fadd(half(vector, 4, 0), half(vector, 4, 4))
    two = builder.fadd(half(four, 2, 0), half(four, 2, 2))
    return builder.fadd(builder.extract_element(two, ir.Constant(_i32, 0)), builder.extract_element(two, ir.Constant(_i32, 1)))


@intrinsic
def _dot64_4bit_avx2(typingctx, packed, pofs, x, xofs, code):
    sig = types.float32(packed, pofs, x, xofs, code)

    def codegen(context, builder, signature, args):
        packed_v, pofs_v, x_v, xofs_v, code_v = args
        at = signature.args
        values = _decode(builder, _data(context, builder, at[0], packed_v), _offset(context, builder, pofs_v, at[1]),
                         _data(context, builder, at[4], code_v))
        x_ptr = builder.gep(_data(context, builder, at[2], x_v), [_offset(context, builder, xofs_v, at[3])])
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v8f, [_v8f] * 3), "llvm.fma.v8f32")
        sums = [ir.Constant(_v8f, [0.0] * 8) for _ in range(4)]  # 4 chains: an FMA's latency is 4 cycles
        for group, value in enumerate(values):
            xv = _load(builder, x_ptr, ir.Constant(_i64, 8 * group), _v8f)
            sums[group % 4] = builder.call(fma, [value, xv, sums[group % 4]])
        total = builder.fadd(builder.fadd(sums[0], sums[1]), builder.fadd(sums[2], sums[3]))
        return _horizontal_sum(builder, total)

    return sig, codegen


@intrinsic
def _decode64_4bit_avx2(typingctx, packed, pofs, code, scale, out, oofs):
    sig = types.void(packed, pofs, code, scale, out, oofs)

    def codegen(context, builder, signature, args):
        packed_v, pofs_v, code_v, scale_v, out_v, oofs_v = args
        at = signature.args
        values = _decode(builder, _data(context, builder, at[0], packed_v), _offset(context, builder, pofs_v, at[1]),
                         _data(context, builder, at[2], code_v))
        scale32 = context.cast(builder, scale_v, at[3], types.float32)
        scales = builder.insert_element(ir.Constant(_v8f, None), scale32, ir.Constant(_i32, 0))
        scales = builder.shuffle_vector(scales, scales, ir.Constant(_v8i, [0] * 8))
        out_ptr = builder.gep(_data(context, builder, at[4], out_v), [_offset(context, builder, oofs_v, at[5])])
        for group, value in enumerate(values):
            target = builder.bitcast(builder.gep(out_ptr, [ir.Constant(_i64, 8 * group)]), _v8f.as_pointer())
            builder.store(builder.fmul(value, scales), target, align=1)
        return context.get_dummy_value()

    return sig, codegen


dot64_4bit = _dot64_4bit_avx2
decode64_4bit = _decode64_4bit_avx2
