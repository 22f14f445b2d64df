"""The SIMD helpers that meet int8 activations (rows quantized by
:func:`sli.kernels.quantize_rows`) in integer dot products, exact in int32 within a block:
``dot8q`` (INT8 weights), ``dot4q`` (INT4's nibbles) and ``dot4l`` (NF4/FP4's 16 levels as
integers: split in two bytes on AVX-512, whole 16-bit words on AVX2). Each block's int32 sums
are scaled into float32 sums as the block ends.

AVX-512 VNNI's ``vpdpbusd`` multiplies unsigned by signed bytes; AVX2's ``vpmaddubsw`` does
too but saturates its int16 pairs (see :meth:`sli.kernels.simd_ir.Emit.dot_bytes`).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .jit import stable_id
from .simd_ir import F32, I8, I16, I32, PREFETCH_VALUES, WIDTH, Emit, const, idx, rows_switch, splat, unpack, vload


def _accumulate(e, fsum, isum, scale):
    """``fsum += float(isum) * scale``: a block's exact int32 sums into the row's float sums."""
    b = e.b
    b.store(e.fma(b.sitofp(b.load(isum), e.vf), scale, b.load(fsum)), fsum)


def _store_sums(e, out_ptr, fsum, minus=None):
    """``out[r]`` = the sum of ``fsum[r]``'s lanes, less ``minus(r)`` where given."""
    b = e.b
    for r in range(len(fsum)):
        total = e.hsum(b.load(fsum[r]))
        if minus is not None:
            total = b.fsub(total, minus(r))
        b.store(total, b.gep(out_ptr, [idx(r)]))


def _each_block_size(b, blocksize, blocks_pass):
    """``blocks_pass(size)`` for the 4-bit codes' ``blocksize``: NF4/FP4's 64 as a constant (one
    step a block, no inner loop), any other size as it is (a loop)."""
    with b.if_else(b.icmp_signed("==", blocksize, idx(64))) as (then, otherwise):
        with then:
            blocks_pass(idx(64))
        with otherwise:
            blocks_pass(blocksize)


def _corr(b, corr_ptr, t0):
    """AVX-512's correction of row ``r``: ``corr[t0 + r]`` (what the levels' + 128 added)."""
    return lambda r: b.load(b.gep(corr_ptr, [b.add(t0, idx(r))]))


def make_dot8q(level: str):
    """``dot8q(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out)``: an int8 weight row times
    int8 activation rows ``xq[(t0 + r)*cols:]`` whose blocks of ``xblock`` values have scales
    ``xs[(t0 + r)*(cols // xblock) + block]``: ``out[r] = sum over blocks of xs * (q . xq)``,
    the block's dot product exact in int32.

    AVX-512 VNNI's ``vpdpbusd`` multiplies unsigned by signed bytes: it takes ``q + 128`` (a
    xor) and ``corr[t0 + r]`` = 128 * sum over blocks of xs * sum(xq) takes the excess back.
    AVX2's ``vpmaddubsw`` would saturate there, so it takes ``|q|`` and ``xq`` with ``q``'s sign
    (llama.cpp's way), which needs no correction (``corr`` unread).
    """
    w = WIDTH[level]

    def dot8q(typingctx, q, qofs, xq, xs, corr, t0, rows, cols, xblock, out):
        sig = types.void(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out)

        def codegen(context, builder, signature, args):
            b = builder
            q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, t0_i, rows_i, cols_i, xblock_i, out_ptr = \
                unpack(context, b, signature, args)
            blocks = b.sdiv(cols_i, xblock_i)

            def case(e, rows):
                fsum = [cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(rows)]
                isum = [cgutils.alloca_once(b, e.vi) for _ in range(rows)]
                xrow = [b.mul(b.add(t0_i, idx(r)), cols_i) for r in range(rows)]
                srow = [b.mul(b.add(t0_i, idx(r)), blocks) for r in range(rows)]
                with cgutils.for_range(b, blocks) as block:
                    first = b.mul(block.index, xblock_i)
                    for r in range(rows):
                        b.store(ir.Constant(e.vi, None), isum[r])
                    with cgutils.for_range(b, b.sdiv(xblock_i, idx(4 * w))) as step:
                        at_value = b.add(first, b.mul(step.index, idx(4 * w)))
                        e.prefetch(q_ptr, b.add(b.add(qofs_i, at_value), idx(PREFETCH_VALUES)))
                        weights = vload(b, q_ptr, b.add(qofs_i, at_value), e.vb)
                        if level == "avx512":
                            unsigned = b.xor(weights, const(e.vb, -128))  # q + 128
                        else:
                            unsigned = e.magnitude(weights)
                        for r in range(rows):
                            xv = vload(b, xq_ptr, b.add(xrow[r], at_value), e.vb)
                            signed = xv if level == "avx512" else e.with_sign_of(xv, weights)
                            b.store(e.dot_bytes(b.load(isum[r]), unsigned, signed), isum[r])
                    for r in range(rows):
                        scale = splat(b, b.load(b.gep(xs_ptr, [b.add(srow[r], block.index)])), e.vf)
                        _accumulate(e, fsum[r], isum[r], scale)
                _store_sums(e, out_ptr, fsum, _corr(b, corr_ptr, t0_i) if level == "avx512" else None)

            rows_switch(b, level, rows_i, case)
            return context.get_dummy_value()

        return sig, codegen

    dot8q.__name__ = f"dot8q_{level}"
    return stable_id(intrinsic(dot8q), f"simd.{dot8q.__name__}")


def make_dot4q(level: str):
    """``dot4q(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out)``: a
    group-wise affine 4-bit row (INT4: ``w = (q - zero) * scale``, ``q`` the nibble) times int8
    activation rows ``xq[(t0 + r)*cols:]``, each 128 values ordered as the 64 even ones then
    the 64 odd ones (:func:`sli.kernels.q4_order`), ``gsum`` their sum per group:
    ``out[r] = sum over groups of scale * (q . xq - zero * gsum)``, ``q . xq`` exact in int32.

    The nibbles are unsigned bytes as they are: ``vpdpbusd`` on AVX-512 VNNI, ``vpmaddubsw``
    (15 * 127 * 2 fits 16 bits) and ``vpmaddwd`` on AVX2.
    """
    w = WIDTH[level]

    def dot4q(typingctx, packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out):
        sig = types.void(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out)

        def codegen(context, builder, signature, args):
            b = builder
            packed_ptr, pofs_i, scales_ptr, zeros_ptr, sofs_i, group_i, xq_ptr, gsum_ptr, t0_i, rows_i, cols_i, \
                out_ptr = unpack(context, b, signature, args)
            groups = b.sdiv(cols_i, group_i)

            def case(e, rows):
                fsum = [cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(rows)]
                fix = [cgutils.alloca_once(b, F32, zfill=True) for _ in range(rows)]
                isum = [cgutils.alloca_once(b, e.vi) for _ in range(rows)]
                xrow = [b.mul(b.add(t0_i, idx(r)), cols_i) for r in range(rows)]
                grow = [b.mul(b.add(t0_i, idx(r)), groups) for r in range(rows)]
                with cgutils.for_range(b, groups) as loop:
                    g = loop.index
                    first = b.mul(g, group_i)
                    for r in range(rows):
                        b.store(ir.Constant(e.vi, None), isum[r])
                    # 128 values (64 bytes) a step, in 4w-byte registers: 64/(4w) of them
                    with cgutils.for_range(b, b.sdiv(group_i, idx(128))) as step:
                        at_value = b.add(first, b.mul(step.index, idx(128)))
                        e.prefetch(packed_ptr, b.add(b.add(pofs_i, b.lshr(at_value, idx(1))), idx(PREFETCH_VALUES // 2)))
                        for part in range(64 // (4 * w)):
                            raw = vload(b, packed_ptr, b.add(pofs_i, b.add(b.lshr(at_value, idx(1)), idx(part * 4 * w))),
                                        e.vb)
                            high, low = e.nibbles(raw)
                            for nibbles, half in ((high, 0), (low, 64)):
                                xoff = b.add(at_value, idx(half + part * 4 * w))
                                for r in range(rows):
                                    xv = vload(b, xq_ptr, b.add(xrow[r], xoff), e.vb)
                                    b.store(e.dot_bytes(b.load(isum[r]), nibbles, xv), isum[r])
                    at_group = b.add(sofs_i, g)
                    scale = b.load(b.gep(scales_ptr, [at_group]))
                    zero_scale = b.fmul(b.load(b.gep(zeros_ptr, [at_group])), scale)
                    for r in range(rows):
                        _accumulate(e, fsum[r], isum[r], splat(b, scale, e.vf))
                        gs = b.load(b.gep(gsum_ptr, [b.add(grow[r], g)]))
                        b.store(b.fadd(b.load(fix[r]), b.fmul(zero_scale, gs)), fix[r])
                _store_sums(e, out_ptr, fsum, lambda r: b.load(fix[r]))

            rows_switch(b, level, rows_i, case)
            return context.get_dummy_value()

        return sig, codegen

    dot4q.__name__ = f"dot4q_{level}"
    return stable_id(intrinsic(dot4q), f"simd.{dot4q.__name__}")


def make_dot4l(level: str):
    """``dot4l(packed, pofs, levels, scales, sofs, blocksize, xq, negsum, t0, rows, cols, out)``:
    a 4-bit row whose value is ``L[nibble] * scales[sofs + block]`` (NF4/FP4, their 16 levels
    as integers ``L = round(code * LEVEL_SCALE)``) times int8 activation rows
    ``xq[(t0 + r)*cols:]``, each 64 values ordered as the 32 even ones then the 32 odd ones
    (:func:`sli.kernels.q4_order`): ``out[r] = sum over blocks of scale * (L[q] . xq)``, the dot
    product exact in int32.

    ``L`` does not fit a byte, so ``levels`` holds it split: ``L = 64 * levels[n] + levels[16 + n]``
    (the high part within +-127, the low within +-32). A byte shuffle (``vpshufb``) looks each
    part up and each meets ``xq`` in its own integer dot product; a block's sums join as
    ``64 * high + low``. (Levels rounded to one byte, llama.cpp IQ4_NL's way, moved SmolLM2's
    NF4 perplexity +0.8%: bitsandbytes' levels are not on an int8 grid.)

    AVX-512 VNNI's ``vpdpbusd`` takes the parts as unsigned bytes ``part + 128``; each block's
    sums start from ``negsum[(t0 + r) * blocks + block]`` = -128 * sum(xq over the block) in one
    lane, which takes the excess back exactly (65 * 128 * sum(xq) once joined). AVX2 has no
    such product without saturation: :func:`make_dot4l_words` looks ``L`` up whole, as 16 bits.
    """
    if level == "avx2":
        return make_dot4l_words()
    w = WIDTH[level]

    def dot4l(typingctx, packed, pofs, levels, scales, sofs, blocksize, xq, negsum, t0, rows, cols, out):
        sig = types.void(packed, pofs, levels, scales, sofs, blocksize, xq, negsum, t0, rows, cols, out)

        def codegen(context, builder, signature, args):
            b = builder
            packed_ptr, pofs_i, levels_ptr, scales_ptr, sofs_i, bs_i, xq_ptr, negsum_ptr, t0_i, rows_i, cols_i, \
                out_ptr = unpack(context, b, signature, args)
            blocks = b.sdiv(cols_i, bs_i)
            v32 = ir.VectorType(I8, 32)
            vb = ir.VectorType(I8, 4 * w)

            def lane_table(first):  # 16 levels in each 128-bit lane (vpshufb looks up within a lane)
                table16 = vload(b, levels_ptr, idx(first), ir.VectorType(I8, 16))
                table = b.shuffle_vector(table16, table16, ir.Constant(ir.VectorType(I32, 4 * w),
                                                                         [k % 16 for k in range(4 * w)]))
                return b.xor(table, const(vb, -128))  # part + 128, unsigned

            tables = (lane_table(0), lane_table(16))  # the high parts, the low parts
            pshufb = Emit(b, level).fn("llvm.x86.avx512.pshuf.b.512", vb, [vb, vb])

            def case(e, rows):
                fsum = [cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(rows)]
                sums = [[cgutils.alloca_once(b, e.vi) for _ in range(rows)] for _ in tables]
                xrow = [b.mul(b.add(t0_i, idx(r)), cols_i) for r in range(rows)]
                nrow = [b.mul(b.add(t0_i, idx(r)), blocks) for r in range(rows)]
                zero = ir.Constant(e.vi, None)

                def blocks_pass(bs_v):
                    with cgutils.for_range(b, blocks) as loop:
                        blk = loop.index
                        first = b.mul(blk, bs_v)
                        for r in range(rows):
                            taken = b.load(b.gep(negsum_ptr, [b.add(nrow[r], blk)]))
                            start = b.insert_element(zero, taken, ir.Constant(I32, 0))  # both parts + 128
                            for part in sums:
                                b.store(start, part[r])
                        with cgutils.for_range(b, b.sdiv(bs_v, idx(64))) as step:  # 64 values: 32 bytes
                            at_value = b.add(first, b.mul(step.index, idx(64)))
                            at_byte = b.add(pofs_i, b.lshr(at_value, idx(1)))
                            e.prefetch(packed_ptr, b.add(at_byte, idx(PREFETCH_VALUES // 2)))
                            high, low = e.nibbles(vload(b, packed_ptr, at_byte, v32))
                            # one register: 32 even values, then 32 odd ones
                            index = b.shuffle_vector(high, low, ir.Constant(ir.VectorType(I32, 64), list(range(64))))
                            xv = [vload(b, xq_ptr, b.add(xrow[r], at_value), vb) for r in range(rows)]
                            for table, part in zip(tables, sums):
                                values = b.call(pshufb, [table, index])
                                for r in range(rows):
                                    b.store(e.dot_bytes(b.load(part[r]), values, xv[r]), part[r])
                        scale = splat(b, b.load(b.gep(scales_ptr, [b.add(sofs_i, blk)])), e.vf)
                        for r in range(rows):
                            joined = b.add(b.shl(b.load(sums[0][r]), const(e.vi, 6)), b.load(sums[1][r]))
                            b.store(e.fma(b.sitofp(joined, e.vf), scale, b.load(fsum[r])), fsum[r])

                _each_block_size(b, bs_i, blocks_pass)
                _store_sums(e, out_ptr, fsum)

            rows_switch(b, level, rows_i, case)
            return context.get_dummy_value()

        return sig, codegen

    dot4l.__name__ = f"dot4l_{level}"
    return stable_id(intrinsic(dot4l), f"simd.{dot4l.__name__}")


def make_dot4l_words():
    """AVX2's ``dot4l`` (the same arguments and sums, ``xq`` as :func:`sli.kernels.levels_order`
    lays it out for this level: int16): each 4-bit code looked up as its level's 16-bit integer
    ``L`` (two byte shuffles, the low and the high byte of ``L``, woven into words within each
    128-bit lane) and multiplied by the activations in ``vpmaddwd`` (signed by signed, pairs
    summed into int32: ``|L| * 127 * 2`` fits, and a 64-value block's four such sums a lane
    too). The activations come widened to 16 bits and in the lanes' order (each 32 values as
    their 0-7, 16-23, 8-15, 24-31), so a row pays one ``vpmaddwd`` (reading memory) and one add
    each 16 values, and the decoding is shared by the rows of a pass. ``vpmaddubsw``'s byte
    products would saturate on ``L``'s split parts, needing each part's sign moved onto ``xq``
    and two sums a row (2-3x the operations a row, measured: docs/benchmarks.md). ``negsum``
    is unread: signed products need no correction."""
    level = "avx2"
    v32 = ir.VectorType(I8, 32)
    v16b = ir.VectorType(I8, 16)
    words = ir.VectorType(I16, 16)

    def dot4l(typingctx, packed, pofs, levels, scales, sofs, blocksize, xq, negsum, t0, rows, cols, out):
        sig = types.void(packed, pofs, levels, scales, sofs, blocksize, xq, negsum, t0, rows, cols, out)

        def codegen(context, builder, signature, args):
            b = builder
            packed_ptr, pofs_i, levels_ptr, scales_ptr, sofs_i, bs_i, xq_ptr, _, t0_i, rows_i, cols_i, out_ptr = \
                unpack(context, b, signature, args)
            blocks = b.sdiv(cols_i, bs_i)
            high16 = b.sext(vload(b, levels_ptr, idx(0), v16b), words)
            whole = b.add(b.shl(high16, const(words, 6)), b.sext(vload(b, levels_ptr, idx(16), v16b), words))

            def lane_table(byte):  # the 16 levels' low or high byte, in each 128-bit lane
                part = b.trunc(b.ashr(whole, const(words, 8)) if byte else whole, v16b)
                return b.shuffle_vector(part, part, ir.Constant(ir.VectorType(I32, 32), [k % 16 for k in range(32)]))

            tables = (lane_table(0), lane_table(1))
            e0 = Emit(b, level)
            pshufb = e0.fn("llvm.x86.avx2.pshuf.b", v32, [v32, v32])
            pmaddwd = e0.fn("llvm.x86.avx2.pmadd.wd", e0.vi, [words, words])

            def woven(low_bytes, high_bytes, h):  # vpunpck{l,h}bw: each lane's bytes 8h..8h+7 as words
                order = [16 * (k // 16) + 8 * h + k % 16 // 2 + (32 if k % 2 else 0) for k in range(32)]
                return b.bitcast(b.shuffle_vector(low_bytes, high_bytes, ir.Constant(ir.VectorType(I32, 32), order)),
                                 words)

            def case(e, rows):
                fsum = [cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(rows)]
                isum = [cgutils.alloca_once(b, e.vi) for _ in range(rows)]
                xrow = [b.mul(b.add(t0_i, idx(r)), cols_i) for r in range(rows)]

                def blocks_pass(bs_v):
                    with cgutils.for_range(b, blocks) as loop:
                        blk = loop.index
                        first = b.mul(blk, bs_v)
                        for r in range(rows):
                            b.store(ir.Constant(e.vi, None), isum[r])
                        with cgutils.for_range(b, b.sdiv(bs_v, idx(64))) as step:  # 64 values: 32 bytes
                            at_value = b.add(first, b.mul(step.index, idx(64)))
                            at_byte = b.add(pofs_i, b.lshr(at_value, idx(1)))
                            e.prefetch(packed_ptr, b.add(at_byte, idx(PREFETCH_VALUES // 2)))
                            high, low = e.nibbles(vload(b, packed_ptr, at_byte, v32))
                            for index, half in ((high, 0), (low, 32)):
                                low_bytes, high_bytes = (b.call(pshufb, [table, index]) for table in tables)
                                for h in (0, 1):
                                    weights = woven(low_bytes, high_bytes, h)
                                    xoff = b.add(at_value, idx(half + 16 * h))
                                    for r in range(rows):
                                        xv = vload(b, xq_ptr, b.add(xrow[r], xoff), words)
                                        b.store(b.add(b.load(isum[r]), b.call(pmaddwd, [weights, xv])), isum[r])
                        scale = splat(b, b.load(b.gep(scales_ptr, [b.add(sofs_i, blk)])), e.vf)
                        for r in range(rows):
                            b.store(e.fma(b.sitofp(b.load(isum[r]), e.vf), scale, b.load(fsum[r])), fsum[r])

                _each_block_size(b, bs_i, blocks_pass)
                _store_sums(e, out_ptr, fsum)

            rows_switch(b, level, rows_i, case)
            return context.get_dummy_value()

        return sig, codegen

    dot4l.__name__ = "dot4l_avx2"
    return stable_id(intrinsic(dot4l), "simd.dot4l_avx2")
