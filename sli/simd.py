"""AVX-512 and AVX2 building blocks for the kernels in :mod:`sli.kernels`.

numba cannot express a 16-entry table lookup, an int8 dot product or a 512-bit register,
and LLVM does not vectorize the plain loops well here (the 4-bit lookup stays scalar:
2–3 instructions a value). The helpers here are numba intrinsics that write the LLVM IR
directly, through llvmlite; callers use them like functions inside ``@njit`` code. Each
multiplies a whole weight row (or a few) by up to four activation rows, keeping its sums
in vector registers from the row's first value to its last.

:func:`helpers` builds one set per instruction level, with the same names and arguments
as :mod:`sli.simd_fallback`'s plain numba functions:

- ``"avx512"`` (AVX-512 F/BW/DQ/VL/VNNI + FMA; a CPU with AVX-512 but not VNNI takes
  "avx2"): 16 floats a register. A 4-bit code's 16 float
  levels fill one register, so one ``vpermps`` decodes 16 values, no blend;
- ``"avx2"`` (AVX2 + FMA): 8 floats a register; a lookup is two ``vpermps`` (table halves
  0–7 and 8–15) and a blend on the index's bit 3.

The helpers (``n`` values of each row, a multiple of 64; ``rows`` from 1 to MAX_ROWS activation
rows ``x[xofs + r*stride : ...]``; ``out[r]`` receives row ``r``'s sum):

- ``lut4(packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out)``: a
  4-bit row (``packed[pofs:]``, two values a byte, the first in the high nibble) whose
  value is ``code[nibble] * scales[sofs + block]``. ``x`` is in the order of
  :data:`LANES` (:func:`sli.kernels.lut4_order`): each ``2*LANES`` values as the even ones,
  then the odd ones, so that a register of high nibbles meets a register of ``x``;
- ``lut4z(packed, pofs, code, scales, zeros, sofs, blocksize, ...)``: the same with value
  ``(code[nibble] - zeros[sofs + block]) * scales[sofs + block]`` (INT4, ``code`` = 0..15);
- ``dot8(q, qofs, x, xofs, n, stride, rows, out)``: an int8 row times float rows;
- ``dotfp8(q, qofs, ...)``: a float8_e4m3fn row (its bytes), decoded by arithmetic;
- ``dotbf16(w, wofs, ...)``: a bfloat16 row (its bits as uint16) times float rows;
- ``decode64_4bit(packed, pofs, code, scale, out, oofs)``: ``out[oofs:oofs+64] =
  code[nibbles] * scale`` in the weight's order (dequantizing).

Every value meets ``x`` through one float32 multiply-add, and each 4-bit value is the
float32 product ``code * scale`` that dequantizing writes, so results equal
dequantize-then-``F.linear`` to float32 rounding (only the order of the sums differs).

This module reaches into numba's and llvmlite's internals (``numba.core.cgutils``, LLVM
IR): :mod:`sli.kernels` imports it inside a guard and uses the plain functions when it
cannot be built, when the CPU lacks the instructions, or when ``SLI_SIMD`` /
``SLI_NO_SIMD`` ask for another level.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Dict, Tuple

from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .simd_fallback import source_hash, stable_id

# Best first. What each level needs from the CPU (llvmlite's feature names).
LEVELS: Tuple[str, ...] = ("avx512", "avx2")
_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni", "avx2", "fma"),
          "avx2": ("avx2", "fma")}
_WIDTH = {"avx512": 16, "avx2": 8}
# Activation rows one pass over a weight row multiplies: their sums stay in registers (32
# on AVX-512, 16 on AVX2).
MAX_ROWS = {"avx512": 8, "avx2": 4}


def host_levels() -> Tuple[str, ...]:
    """The levels this CPU runs, best first (none when numba compiles for another CPU)."""
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return ()  # numba compiles for another (e.g. generic) CPU: it may lack them
    features = binding.get_host_cpu_features()
    return tuple(level for level in LEVELS if all(features.get(name) for name in _NEEDS[level]))


SOURCE_HASH = source_hash(__file__)  # in each helper's id: numba's cache keys kernels by it


_f32, _i32, _i16, _i8, _i64 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(8), ir.IntType(64)


def _data(context, builder, array_type, value):
    return context.make_array(array_type)(context, builder, value).data


def _intp(context, builder, value, value_type):
    return context.cast(builder, value, value_type, types.intp)


def _vload(builder, pointer, index, vector_type):
    return builder.load(builder.bitcast(builder.gep(pointer, [index]), vector_type.as_pointer()), align=1)


def _vstore(builder, value, pointer, index):
    builder.store(value, builder.bitcast(builder.gep(pointer, [index]), value.type.as_pointer()), align=1)


def _splat(builder, scalar, vector_type):
    lanes = vector_type.count
    one = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_i32, lanes), [0] * lanes))


def _const(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def _add(builder, a, b):
    return builder.add(a, b)


def _i(value: int):
    return ir.Constant(_i64, value)


class _Emit:
    """IR for one level: its vector types, lookups and reductions."""

    def __init__(self, builder, level: str):
        self.b = builder
        self.level = level
        self.w = _WIDTH[level]
        self.vf = ir.VectorType(_f32, self.w)
        self.vi = ir.VectorType(_i32, self.w)

    def fn(self, name, ret, args):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, args), name)

    def fma(self, a, x, acc):
        return self.b.call(self.fn(f"llvm.fma.v{self.w}f32", self.vf, [self.vf] * 3), [a, x, acc])

    def table(self, code_ptr):
        """The 16 float levels at ``code_ptr`` as a table :meth:`lookup` reads."""
        if self.w == 16:
            return (_vload(self.b, code_ptr, _i(0), self.vf),)
        return _vload(self.b, code_ptr, _i(0), self.vf), _vload(self.b, code_ptr, _i(8), self.vf)

    def map_table(self, table, f):
        return tuple(f(part) for part in table)

    def lookup(self, table, index):
        """``table[index & 15]`` for each lane (only the index's low 4 bits are read)."""
        b = self.b
        if self.w == 16:
            return b.call(self.fn("llvm.x86.avx512.permvar.sf.512", self.vf, [self.vf, self.vi]), [table[0], index])
        permps = self.fn("llvm.x86.avx2.permps", self.vf, [self.vf, self.vi])
        low = b.call(permps, [table[0], index])  # permps reads the index's low 3 bits
        high = b.call(permps, [table[1], index])
        bit3 = b.shl(index, _const(self.vi, 28))  # bit 3 to the sign: a vblendvps
        return b.select(b.icmp_signed("<", bit3, _const(self.vi, 0)), high, low)

    def hsum(self, vector):
        b = self.b
        lanes = self.w
        while lanes > 1:
            lanes //= 2
            low = b.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_i32, lanes), list(range(lanes))))
            high = b.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_i32, lanes), list(range(lanes, 2 * lanes))))
            vector = b.fadd(low, high)
        return b.extract_element(vector, ir.Constant(_i32, 0))


def _chains(rows: int) -> int:
    # independent sums a row: an FMA's result is ready 4 cycles later and two start a cycle
    return max(1, 4 // rows)


def _row_pass(context, builder, level, n, block, x_ptr, xofs, stride, rows_value, out_ptr, begin_block, body):
    """Emit, for each ``rows`` in 1..MAX_ROWS[level] (switched on ``rows_value`` at run time), the
    loop over ``n`` values (blocks of ``block`` values, 64 at a time) and the store of each
    activation row's sum to ``out[r]``.

    ``begin_block(e, index)`` emits what a block needs first (its table). ``body(e, unit,
    multiply)`` emits one 64-value step at value offset ``unit``: it calls ``multiply(vector,
    xoffset)`` for each register of decoded weights, whose values meet
    ``x[xofs + r*stride + xoffset :][:lanes]`` in each row ``r``.
    """
    b = builder
    done = b.append_basic_block("rows.done")
    switch = b.switch(rows_value, done)
    for rows in range(1, MAX_ROWS[level] + 1):
        case = b.append_basic_block(f"rows.{rows}")
        switch.add_case(ir.Constant(rows_value.type, rows), case)
        with b.goto_block(case):
            e = _Emit(b, level)
            chains = _chains(rows)
            sums = [[cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(chains)] for _ in range(rows)]
            count = [0]

            def multiply(vector, xoffset, sums=sums, chains=chains, rows=rows, e=e):
                chain = count[0] % chains
                count[0] += 1
                for r in range(rows):
                    xv = _vload(b, x_ptr, b.add(b.add(xofs, b.mul(stride, _i(r))), xoffset), e.vf)
                    b.store(e.fma(vector, xv, b.load(sums[r][chain])), sums[r][chain])

            with cgutils.for_range(b, b.sdiv(n, block)) as outer:
                first = b.mul(outer.index, block)
                begin_block(e, outer.index)
                with cgutils.for_range(b, b.sdiv(block, _i(64))) as inner:
                    body(e, b.add(first, b.mul(inner.index, _i(64))), multiply)
            for r in range(rows):
                total = b.load(sums[r][0])
                for chain in range(1, chains):
                    total = b.fadd(total, b.load(sums[r][chain]))
                b.store(e.hsum(total), b.gep(out_ptr, [_i(r)]))
            b.branch(done)
    b.position_at_end(done)


def _make_lut4(level: str, kind: str):
    """``lut4`` (kind "scale"), ``lut4z`` ("affine": a zero point too) or ``lut4n`` ("nested":
    8-bit block maxima ``nested_code[qabsmax[block]] * nested + offset``, bitsandbytes' double
    quantization, decoded as each block starts)."""
    w = _WIDTH[level]
    extra = {"scale": 1, "affine": 2, "nested": 4}[kind]  # arguments between code and sofs

    def typer(typingctx, *args):
        return types.void(*args), codegen

    if kind == "affine":
        def lut4(typingctx, packed, pofs, code, scales, zeros, sofs, blocksize, x, xofs, n, stride, rows, out):
            return typer(typingctx, packed, pofs, code, scales, zeros, sofs, blocksize, x, xofs, n, stride, rows, out)
    elif kind == "nested":
        def lut4(typingctx, packed, pofs, code, qabsmax, nested_code, nested, offset, sofs, blocksize, x, xofs, n,
                 stride, rows, out):
            return typer(typingctx, packed, pofs, code, qabsmax, nested_code, nested, offset, sofs, blocksize, x, xofs,
                         n, stride, rows, out)
    else:
        def lut4(typingctx, packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out):
            return typer(typingctx, packed, pofs, code, scales, sofs, blocksize, x, xofs, n, stride, rows, out)

    def codegen(context, builder, signature, args):
        at = signature.args
        b = builder
        k = 3 + extra
        packed_ptr = _data(context, b, at[0], args[0])
        pofs_i = _intp(context, b, args[1], at[1])
        code_ptr = _data(context, b, at[2], args[2])
        scales_ptr = _data(context, b, at[3], args[3])
        if kind == "affine":
            zeros_ptr = _data(context, b, at[4], args[4])
        elif kind == "nested":
            nested_code_ptr = _data(context, b, at[4], args[4])
            nested = context.cast(b, args[5], at[5], types.float32)
            offset = context.cast(b, args[6], at[6], types.float32)
        sofs_i = _intp(context, b, args[k], at[k])
        bs_i = _intp(context, b, args[k + 1], at[k + 1])
        x_ptr = _data(context, b, at[k + 2], args[k + 2])
        xofs_i = _intp(context, b, args[k + 3], at[k + 3])
        n_i = _intp(context, b, args[k + 4], at[k + 4])
        stride_i = _intp(context, b, args[k + 5], at[k + 5])
        rows_i = _intp(context, b, args[k + 6], at[k + 6])
        out_ptr = _data(context, b, at[k + 7], args[k + 7])
        slots = []

        def begin_block(e, index):  # the block's table: code * scale (or (code - zero) * scale)
            if not slots:
                slots.extend(cgutils.alloca_once(b, e.vf) for _ in range(16 // e.w))
            at_block = b.add(sofs_i, index)
            if kind == "nested":
                q = b.zext(b.load(b.gep(scales_ptr, [at_block])), _i64)
                scale = b.fadd(b.fmul(b.load(b.gep(nested_code_ptr, [q])), nested), offset)
            else:
                scale = b.load(b.gep(scales_ptr, [at_block]))
            scale = _splat(b, scale, e.vf)
            code = e.table(code_ptr)
            if kind == "affine":
                zero = _splat(b, b.load(b.gep(zeros_ptr, [at_block])), e.vf)
                table = e.map_table(code, lambda part: b.fmul(b.fsub(part, zero), scale))
            else:
                table = e.map_table(code, lambda part: b.fmul(part, scale))
            for slot, part in zip(slots, table):
                b.store(part, slot)

        def body(e, unit, multiply):
            table = tuple(b.load(slot) for slot in slots)
            for chunk in range(64 // (2 * w)):  # 2w values from w bytes
                raw = _vload(b, packed_ptr, b.add(pofs_i, b.add(b.lshr(unit, _i(1)), _i(chunk * w))),
                             ir.VectorType(_i8, w))
                index = b.zext(raw, e.vi)  # the low nibble is the index's low 4 bits
                high = b.lshr(index, _const(e.vi, 4))
                xoffset = b.add(unit, _i(chunk * 2 * w))
                multiply(e.lookup(table, high), xoffset)
                multiply(e.lookup(table, index), b.add(xoffset, _i(w)))

        _row_pass(context, b, level, n_i, bs_i, x_ptr, xofs_i, stride_i, rows_i, out_ptr, begin_block, body)
        return context.get_dummy_value()

    lut4.__name__ = f"lut4{dict(scale='', affine='z', nested='n')[kind]}_{level}"
    return stable_id(intrinsic(lut4), f"simd.{lut4.__name__}:{SOURCE_HASH}")


def _e4m3(b, e, byte):
    """float8_e4m3fn bytes (zero-extended to i32 lanes) as float32, exactly: a normal value's
    exponent and mantissa move into place and the bias grows by 120; a subnormal (exponent
    0) is its mantissa times 2**-9; 0x7f and 0xff are NaN."""
    magnitude = b.and_(byte, _const(e.vi, 0x7F))
    normal = b.add(b.shl(magnitude, _const(e.vi, 20)), _const(e.vi, 120 << 23))
    subnormal = b.bitcast(b.fmul(b.sitofp(magnitude, e.vf), _const(e.vf, 2.0 ** -9)), e.vi)
    bits = b.select(b.icmp_unsigned("<", magnitude, _const(e.vi, 8)), subnormal, normal)
    bits = b.or_(bits, b.shl(b.and_(byte, _const(e.vi, 0x80)), _const(e.vi, 24)))
    value = b.bitcast(bits, e.vf)
    return b.select(b.icmp_unsigned("==", magnitude, _const(e.vi, 0x7F)), _const(e.vf, float("nan")), value)


def _make_widening_dot(level: str, kind: str):
    """``dot8`` (int8 weights), ``dotfp8`` (float8_e4m3fn bytes) or ``dotbf16`` (bfloat16
    bits): natural order, no table."""
    w = _WIDTH[level]

    def dot(typingctx, weights, wofs, x, xofs, n, stride, rows, out):
        sig = types.void(weights, wofs, x, xofs, n, stride, rows, out)

        def codegen(context, builder, signature, args):
            at = signature.args
            b = builder
            w_ptr = _data(context, b, at[0], args[0])
            wofs_i = _intp(context, b, args[1], at[1])
            x_ptr = _data(context, b, at[2], args[2])
            xofs_i = _intp(context, b, args[3], at[3])
            n_i = _intp(context, b, args[4], at[4])
            stride_i = _intp(context, b, args[5], at[5])
            rows_i = _intp(context, b, args[6], at[6])
            out_ptr = _data(context, b, at[7], args[7])

            def body(e, unit, multiply):
                for part in range(64 // w):
                    at_value = b.add(unit, _i(part * w))
                    if kind == "int8":
                        raw = _vload(b, w_ptr, b.add(wofs_i, at_value), ir.VectorType(_i8, w))
                        values = b.sitofp(b.sext(raw, e.vi), e.vf)
                    elif kind == "fp8":
                        raw = _vload(b, w_ptr, b.add(wofs_i, at_value), ir.VectorType(_i8, w))
                        values = _e4m3(b, e, b.zext(raw, e.vi))
                    else:
                        raw = _vload(b, w_ptr, b.add(wofs_i, at_value), ir.VectorType(_i16, w))
                        values = b.bitcast(b.shl(b.zext(raw, e.vi), _const(e.vi, 16)), e.vf)
                    multiply(values, at_value)

            _row_pass(context, b, level, n_i, _i(64), x_ptr, xofs_i, stride_i, rows_i, out_ptr, lambda e, index: None, body)
            return context.get_dummy_value()

        return sig, codegen

    dot.__name__ = f"dot{dict(int8='8', fp8='fp8', bf16='bf16')[kind]}_{level}"
    return stable_id(intrinsic(dot), f"simd.{dot.__name__}:{SOURCE_HASH}")


def _make_dot8q(level: str):
    """``dot8q(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out)``: an int8 weight row times
    int8 activation rows ``xq[(t0 + r)*cols:]`` whose blocks of ``xblock`` values have scales
    ``xs[(t0 + r)*(cols // xblock) + block]``: ``out[r] = sum over blocks of xs * (q . xq)``,
    the block's dot product exact in int32.

    AVX-512 VNNI's ``vpdpbusd`` multiplies unsigned by signed bytes: it takes ``q + 128`` (a
    xor) and ``corr[t0 + r]`` = 128 * sum over blocks of xs * sum(xq) takes the excess back.
    AVX2's ``vpmaddubsw`` would saturate there, so it takes ``|q|`` and ``xq`` with ``q``'s sign
    (llama.cpp's way), which needs no correction (``corr`` unread).
    """
    w = _WIDTH[level]

    def dot8q(typingctx, q, qofs, xq, xs, corr, t0, rows, cols, xblock, out):
        sig = types.void(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out)

        def codegen(context, builder, signature, args):
            at = signature.args
            b = builder
            q_ptr = _data(context, b, at[0], args[0])
            qofs_i = _intp(context, b, args[1], at[1])
            xq_ptr = _data(context, b, at[2], args[2])
            xs_ptr = _data(context, b, at[3], args[3])
            corr_ptr = _data(context, b, at[4], args[4])
            t0_i = _intp(context, b, args[5], at[5])
            rows_i = _intp(context, b, args[6], at[6])
            cols_i = _intp(context, b, args[7], at[7])
            xblock_i = _intp(context, b, args[8], at[8])
            out_ptr = _data(context, b, at[9], args[9])
            blocks = b.sdiv(cols_i, xblock_i)
            vi = ir.VectorType(_i32, w)
            vb = ir.VectorType(_i8, 4 * w)
            done = b.append_basic_block("rows.done")
            switch = b.switch(rows_i, done)
            for rows in range(1, MAX_ROWS[level] + 1):
                case = b.append_basic_block(f"rows.{rows}")
                switch.add_case(ir.Constant(rows_i.type, rows), case)
                with b.goto_block(case):
                    e = _Emit(b, level)
                    fsum = [cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(rows)]
                    isum = [cgutils.alloca_once(b, vi) for _ in range(rows)]
                    xrow = [b.mul(b.add(t0_i, _i(r)), cols_i) for r in range(rows)]
                    srow = [b.mul(b.add(t0_i, _i(r)), blocks) for r in range(rows)]
                    with cgutils.for_range(b, blocks) as block:
                        first = b.mul(block.index, xblock_i)
                        for r in range(rows):
                            b.store(ir.Constant(vi, None), isum[r])
                        with cgutils.for_range(b, b.sdiv(xblock_i, _i(4 * w))) as step:
                            at_value = b.add(first, b.mul(step.index, _i(4 * w)))
                            weights = _vload(b, q_ptr, b.add(qofs_i, at_value), vb)
                            if level == "avx512":
                                unsigned = b.bitcast(b.xor(weights, _const(vb, -128)), vi)  # q + 128
                                dpbusd = e.fn("llvm.x86.avx512.vpdpbusd.512", vi, [vi, vi, vi])
                            else:
                                unsigned = b.call(e.fn(f"llvm.abs.v{4 * w}i8", vb, [vb, ir.IntType(1)]),
                                                  [weights, ir.Constant(ir.IntType(1), 0)])
                                psign = e.fn("llvm.x86.avx2.psign.b", vb, [vb, vb])
                                maddubs = e.fn("llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(_i16, 2 * w), [vb, vb])
                                maddwd = e.fn("llvm.x86.avx2.pmadd.wd", vi, [ir.VectorType(_i16, 2 * w)] * 2)
                                ones = _const(ir.VectorType(_i16, 2 * w), 1)
                            for r in range(rows):
                                xv = _vload(b, xq_ptr, b.add(xrow[r], at_value), vb)
                                if level == "avx512":
                                    b.store(b.call(dpbusd, [b.load(isum[r]), unsigned, b.bitcast(xv, vi)]), isum[r])
                                else:
                                    pairs = b.call(maddubs, [unsigned, b.call(psign, [xv, weights])])
                                    b.store(b.add(b.load(isum[r]), b.call(maddwd, [pairs, ones])), isum[r])
                        for r in range(rows):
                            scale = _splat(b, b.load(b.gep(xs_ptr, [b.add(srow[r], block.index)])), e.vf)
                            b.store(e.fma(b.sitofp(b.load(isum[r]), e.vf), scale, b.load(fsum[r])), fsum[r])
                    for r in range(rows):
                        total = e.hsum(b.load(fsum[r]))
                        if level == "avx512":
                            total = b.fsub(total, b.load(b.gep(corr_ptr, [b.add(t0_i, _i(r))])))
                        b.store(total, b.gep(out_ptr, [_i(r)]))
                    b.branch(done)
            b.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    dot8q.__name__ = f"dot8q_{level}"
    return stable_id(intrinsic(dot8q), f"simd.{dot8q.__name__}:{SOURCE_HASH}")


def _make_dot4q(level: str):
    """``dot4q(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out)``: a
    group-wise affine 4-bit row (INT4: ``w = (q - zero) * scale``, ``q`` the nibble) times int8
    activation rows ``xq[(t0 + r)*cols:]``, each 128 values ordered as the 64 even ones then
    the 64 odd ones (:func:`sli.kernels.q4_order`), ``gsum`` their sum per group:
    ``out[r] = sum over groups of scale * (q . xq - zero * gsum)``, ``q . xq`` exact in int32.

    The nibbles are unsigned bytes as they are: ``vpdpbusd`` on AVX-512 VNNI, ``vpmaddubsw``
    (15 * 127 * 2 fits 16 bits) and ``vpmaddwd`` on AVX2.
    """
    w = _WIDTH[level]

    def dot4q(typingctx, packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out):
        sig = types.void(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out)

        def codegen(context, builder, signature, args):
            at = signature.args
            b = builder
            packed_ptr = _data(context, b, at[0], args[0])
            pofs_i = _intp(context, b, args[1], at[1])
            scales_ptr = _data(context, b, at[2], args[2])
            zeros_ptr = _data(context, b, at[3], args[3])
            sofs_i = _intp(context, b, args[4], at[4])
            group_i = _intp(context, b, args[5], at[5])
            xq_ptr = _data(context, b, at[6], args[6])
            gsum_ptr = _data(context, b, at[7], args[7])
            t0_i = _intp(context, b, args[8], at[8])
            rows_i = _intp(context, b, args[9], at[9])
            cols_i = _intp(context, b, args[10], at[10])
            out_ptr = _data(context, b, at[11], args[11])
            groups = b.sdiv(cols_i, group_i)
            vi = ir.VectorType(_i32, w)
            vb = ir.VectorType(_i8, 4 * w)
            v16 = ir.VectorType(_i16, 2 * w)
            done = b.append_basic_block("rows.done")
            switch = b.switch(rows_i, done)
            for rows in range(1, MAX_ROWS[level] + 1):
                case = b.append_basic_block(f"rows.{rows}")
                switch.add_case(ir.Constant(rows_i.type, rows), case)
                with b.goto_block(case):
                    e = _Emit(b, level)
                    fsum = [cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(rows)]
                    fix = [cgutils.alloca_once(b, _f32, zfill=True) for _ in range(rows)]
                    isum = [cgutils.alloca_once(b, vi) for _ in range(rows)]
                    xrow = [b.mul(b.add(t0_i, _i(r)), cols_i) for r in range(rows)]
                    grow = [b.mul(b.add(t0_i, _i(r)), groups) for r in range(rows)]
                    with cgutils.for_range(b, groups) as loop:
                        g = loop.index
                        first = b.mul(g, group_i)
                        for r in range(rows):
                            b.store(ir.Constant(vi, None), isum[r])
                        # 128 values (64 bytes) a step, in 4w-byte registers: 64/(4w) of them
                        with cgutils.for_range(b, b.sdiv(group_i, _i(128))) as step:
                            at_value = b.add(first, b.mul(step.index, _i(128)))
                            for part in range(64 // (4 * w)):
                                raw = _vload(b, packed_ptr, b.add(pofs_i, b.add(b.lshr(at_value, _i(1)), _i(part * 4 * w))),
                                             vb)
                                low = b.and_(raw, _const(vb, 15))
                                high = b.and_(b.bitcast(b.lshr(b.bitcast(raw, v16), _const(v16, 4)), vb), _const(vb, 15))
                                for nibbles, half in ((high, 0), (low, 64)):
                                    xoff = b.add(at_value, _i(half + part * 4 * w))
                                    for r in range(rows):
                                        xv = _vload(b, xq_ptr, b.add(xrow[r], xoff), vb)
                                        if level == "avx512":
                                            dp = e.fn("llvm.x86.avx512.vpdpbusd.512", vi, [vi, vi, vi])
                                            b.store(b.call(dp, [b.load(isum[r]), b.bitcast(nibbles, vi), b.bitcast(xv, vi)]),
                                                    isum[r])
                                        else:
                                            maddubs = e.fn("llvm.x86.avx2.pmadd.ub.sw", v16, [vb, vb])
                                            maddwd = e.fn("llvm.x86.avx2.pmadd.wd", vi, [v16, v16])
                                            pairs = b.call(maddubs, [nibbles, xv])
                                            b.store(b.add(b.load(isum[r]), b.call(maddwd, [pairs, _const(v16, 1)])), isum[r])
                        at_group = b.add(sofs_i, g)
                        scale = b.load(b.gep(scales_ptr, [at_group]))
                        zero_scale = b.fmul(b.load(b.gep(zeros_ptr, [at_group])), scale)
                        for r in range(rows):
                            b.store(e.fma(b.sitofp(b.load(isum[r]), e.vf), _splat(b, scale, e.vf), b.load(fsum[r])), fsum[r])
                            gs = b.load(b.gep(gsum_ptr, [b.add(grow[r], g)]))
                            b.store(b.fadd(b.load(fix[r]), b.fmul(zero_scale, gs)), fix[r])
                    for r in range(rows):
                        b.store(b.fsub(e.hsum(b.load(fsum[r])), b.load(fix[r])), b.gep(out_ptr, [_i(r)]))
                    b.branch(done)
            b.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    dot4q.__name__ = f"dot4q_{level}"
    return stable_id(intrinsic(dot4q), f"simd.{dot4q.__name__}:{SOURCE_HASH}")


def _make_dot4l(level: str):
    """``dot4l(packed, pofs, levels, scales, sofs, blocksize, xq, corr, t0, rows, cols, out)``: a
    4-bit row whose value is ``levels[nibble] * scales[sofs + block]`` (NF4/FP4 with their 16
    levels as int8, IQ4_NL's way) times int8 activation rows ``xq[(t0 + r)*cols:]``, each 64
    values ordered as the 32 even ones then the 32 odd ones (:func:`sli.kernels.q4_order`):
    ``out[r] = sum over blocks of scale * (levels[q] . xq)``, the dot product exact in int32.

    A byte shuffle (``vpshufb``) looks the levels up. AVX-512 VNNI's ``vpdpbusd`` takes them
    as unsigned bytes ``level + 128`` and subtracts ``corr[t0 + r]`` = 128 * sum over blocks of
    scale * sum(xq) (the caller's, see :data:`OFFSET_LEVELS`); AVX2 takes ``|level|`` and
    ``xq`` with the level's sign (``corr`` unread).
    """
    w = _WIDTH[level]

    def dot4l(typingctx, packed, pofs, levels, scales, sofs, blocksize, xq, corr, t0, rows, cols, out):
        sig = types.void(packed, pofs, levels, scales, sofs, blocksize, xq, corr, t0, rows, cols, out)

        def codegen(context, builder, signature, args):
            at = signature.args
            b = builder
            packed_ptr = _data(context, b, at[0], args[0])
            pofs_i = _intp(context, b, args[1], at[1])
            levels_ptr = _data(context, b, at[2], args[2])
            scales_ptr = _data(context, b, at[3], args[3])
            sofs_i = _intp(context, b, args[4], at[4])
            bs_i = _intp(context, b, args[5], at[5])
            xq_ptr = _data(context, b, at[6], args[6])
            corr_ptr = _data(context, b, at[7], args[7])
            t0_i = _intp(context, b, args[8], at[8])
            rows_i = _intp(context, b, args[9], at[9])
            cols_i = _intp(context, b, args[10], at[10])
            out_ptr = _data(context, b, at[11], args[11])
            blocks = b.sdiv(cols_i, bs_i)
            vi = ir.VectorType(_i32, w)
            vb = ir.VectorType(_i8, 4 * w)
            v32 = ir.VectorType(_i8, 32)
            v16 = ir.VectorType(_i16, 2 * w)
            # the 16 levels in each 128-bit lane (vpshufb looks up within a lane)
            table16 = _vload(b, levels_ptr, _i(0), ir.VectorType(_i8, 16))
            table = b.shuffle_vector(table16, table16, ir.Constant(ir.VectorType(_i32, 4 * w),
                                                                     [k % 16 for k in range(4 * w)]))
            if level == "avx512":
                table = b.xor(table, _const(vb, -128))  # level + 128, unsigned
                pshufb = cgutils.get_or_insert_function(b.module, ir.FunctionType(vb, [vb, vb]),
                                                        "llvm.x86.avx512.pshuf.b.512")
            else:
                pshufb = cgutils.get_or_insert_function(b.module, ir.FunctionType(vb, [vb, vb]),
                                                        "llvm.x86.avx2.pshuf.b")
            done = b.append_basic_block("rows.done")
            switch = b.switch(rows_i, done)
            for rows in range(1, MAX_ROWS[level] + 1):
                case = b.append_basic_block(f"rows.{rows}")
                switch.add_case(ir.Constant(rows_i.type, rows), case)
                with b.goto_block(case):
                    e = _Emit(b, level)
                    fsum = [cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(rows)]
                    isum = [cgutils.alloca_once(b, vi) for _ in range(rows)]
                    xrow = [b.mul(b.add(t0_i, _i(r)), cols_i) for r in range(rows)]
                    def blocks_pass(bs_v, rows=rows, e=e, fsum=fsum, isum=isum, xrow=xrow):
                        with cgutils.for_range(b, blocks) as loop:
                            blk = loop.index
                            first = b.mul(blk, bs_v)
                            for r in range(rows):
                                b.store(ir.Constant(vi, None), isum[r])
                            with cgutils.for_range(b, b.sdiv(bs_v, _i(64))) as step:  # 64 values: 32 bytes
                                at_value = b.add(first, b.mul(step.index, _i(64)))
                                raw = _vload(b, packed_ptr, b.add(pofs_i, b.lshr(at_value, _i(1))), v32)
                                low = b.and_(raw, _const(v32, 15))
                                high = b.and_(b.bitcast(b.lshr(b.bitcast(raw, ir.VectorType(_i16, 16)),
                                                               _const(ir.VectorType(_i16, 16), 4)), v32), _const(v32, 15))
                                if level == "avx512":  # one register: 32 even values, then 32 odd ones
                                    index = b.shuffle_vector(high, low, ir.Constant(ir.VectorType(_i32, 64), list(range(64))))
                                    parts = [(b.call(pshufb, [table, index]), 0)]
                                else:
                                    parts = [(b.call(pshufb, [table, high]), 0), (b.call(pshufb, [table, low]), 32)]
                                for values, half in parts:
                                    if level != "avx512":
                                        magnitude = b.call(e.fn("llvm.abs.v32i8", vb, [vb, ir.IntType(1)]),
                                                           [values, ir.Constant(ir.IntType(1), 0)])
                                    for r in range(rows):
                                        xv = _vload(b, xq_ptr, b.add(xrow[r], b.add(at_value, _i(half))), vb)
                                        if level == "avx512":
                                            dp = e.fn("llvm.x86.avx512.vpdpbusd.512", vi, [vi, vi, vi])
                                            b.store(b.call(dp, [b.load(isum[r]), b.bitcast(values, vi), b.bitcast(xv, vi)]),
                                                    isum[r])
                                        else:
                                            signed = b.call(e.fn("llvm.x86.avx2.psign.b", vb, [vb, vb]), [xv, values])
                                            pairs = b.call(e.fn("llvm.x86.avx2.pmadd.ub.sw", v16, [vb, vb]), [magnitude, signed])
                                            wide = b.call(e.fn("llvm.x86.avx2.pmadd.wd", vi, [v16, v16]), [pairs, _const(v16, 1)])
                                            b.store(b.add(b.load(isum[r]), wide), isum[r])
                            scale = _splat(b, b.load(b.gep(scales_ptr, [b.add(sofs_i, blk)])), e.vf)
                            for r in range(rows):
                                b.store(e.fma(b.sitofp(b.load(isum[r]), e.vf), scale, b.load(fsum[r])), fsum[r])

                    # NF4/FP4's 64-value block: one step a block, no inner loop; any other size: a loop
                    with b.if_else(b.icmp_signed("==", bs_i, _i(64))) as (then, otherwise):
                        with then:
                            blocks_pass(_i(64))
                        with otherwise:
                            blocks_pass(bs_i)
                    for r in range(rows):
                        total = e.hsum(b.load(fsum[r]))
                        if level == "avx512":
                            total = b.fsub(total, b.load(b.gep(corr_ptr, [b.add(t0_i, _i(r))])))
                        b.store(total, b.gep(out_ptr, [_i(r)]))
                    b.branch(done)
            b.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    dot4l.__name__ = f"dot4l_{level}"
    return stable_id(intrinsic(dot4l), f"simd.{dot4l.__name__}:{SOURCE_HASH}")


def _make_decode64(level: str):
    w = _WIDTH[level]

    def decode64_4bit(typingctx, packed, pofs, code, scale, out, oofs):
        sig = types.void(packed, pofs, code, scale, out, oofs)

        def codegen(context, builder, signature, args):
            packed_v, pofs_v, code_v, scale_v, out_v, oofs_v = args
            at = signature.args
            b = builder
            e = _Emit(b, level)
            scale = _splat(b, context.cast(b, scale_v, at[3], types.float32), e.vf)
            table = e.map_table(e.table(_data(context, b, at[2], code_v)), lambda part: b.fmul(part, scale))
            v32 = ir.VectorType(_i8, 32)
            raw = _vload(b, _data(context, b, at[0], packed_v), _intp(context, b, pofs_v, at[1]), v32)
            high = b.lshr(raw, ir.Constant(v32, [4] * 32))
            low = b.and_(raw, ir.Constant(v32, [15] * 32))
            interleave = [i for k in range(32) for i in (k, 32 + k)]
            nibbles = b.shuffle_vector(high, low, ir.Constant(ir.VectorType(_i32, 64), interleave))
            out_ptr = b.gep(_data(context, b, at[4], out_v), [_intp(context, b, oofs_v, at[5])])
            undef = ir.Constant(ir.VectorType(_i8, 64), None)
            for group in range(64 // w):
                pick = ir.Constant(ir.VectorType(_i32, w), list(range(w * group, w * group + w)))
                index = b.zext(b.shuffle_vector(nibbles, undef, pick), e.vi)
                _vstore(b, e.lookup(table, index), out_ptr, _i(w * group))
            return context.get_dummy_value()

        return sig, codegen

    decode64_4bit.__name__ = f"decode64_4bit_{level}"
    return stable_id(intrinsic(decode64_4bit), f"simd.{decode64_4bit.__name__}:{SOURCE_HASH}")


_built: Dict[str, SimpleNamespace] = {}


def helpers(level: str) -> SimpleNamespace:
    """The helpers of ``level`` ("avx512" or "avx2"), built once."""
    if level not in _built:
        _built[level] = SimpleNamespace(
            level=level, lanes=_WIDTH[level], max_rows=MAX_ROWS[level],
            offset_levels=level == "avx512",  # dot4l takes back an offset: see its corr
            lut4=_make_lut4(level, "scale"), lut4z=_make_lut4(level, "affine"), lut4n=_make_lut4(level, "nested"),
            dot8=_make_widening_dot(level, "int8"), dotfp8=_make_widening_dot(level, "fp8"), dot8q=_make_dot8q(level), dot4q=_make_dot4q(level), dot4l=_make_dot4l(level), dotbf16=_make_widening_dot(level, "bf16"),
            decode64_4bit=_make_decode64(level))
    return _built[level]
