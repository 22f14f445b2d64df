"""The SIMD helpers that meet int8 activations (rows quantized by
:func:`sli.kernels.quantize_rows`) in integer dot products, exact in int32 within a block:
``dot8q`` (INT8 weights), ``dot4q`` (INT4's nibbles) and ``dot4l`` (NF4/FP4's 16 levels as
16-bit integers, met in word products). Each block's int32 sums (dot4l: each 64 values') are
scaled into float32 sums as the block ends.

AVX-512 VNNI's ``vpdpbusd`` multiplies unsigned by signed bytes; AVX2's ``vpmaddubsw`` does
too but saturates its int16 pairs (see :meth:`sli.kernels.simd_ir.Emit.dot_bytes`).
"""
from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from .jit import stable_id
from .plain import TILE_WEIGHT_ROWS, WEIGHT_ROWS
from .simd_ir import F32, I8, I16, I32, Emit, const, half_to_float, idx, rows_switch, splat, unpack, vload


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
    return _dot8q_passes(level, 1, f"dot8q_{level}")


def _dot8q_passes(level: str, weight_rows: int, name: str):
    """The intrinsic of :func:`make_dot8q` (``weight_rows`` 1) and :func:`make_dot8q_tile`: each
    pass of activation rows a run-time switch case over ``weight_rows`` weight rows."""
    def dot8q(typingctx, q, qofs, xq, xs, corr, t0, rows, cols, xblock, out):
        sig = types.void(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out)

        def codegen(context, builder, signature, args):
            q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, t0_i, rows_i, cols_i, xblock_i, out_ptr = \
                unpack(context, builder, signature, args)
            rows_switch(builder, level, rows_i, lambda e, rows: _dot8q_pass(
                e, q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, t0_i, rows, weight_rows, cols_i, xblock_i, out_ptr))
            return context.get_dummy_value()

        return sig, codegen

    dot8q.__name__ = name
    return stable_id(intrinsic(dot8q), f"simd.{name}")


def make_dot8q_tile(level: str):
    """``dot8q_tile(q, qofs, xq, xs, corr, t0, rows, cols, xblock, out)``: :data:`TILE_WEIGHT_ROWS`
    consecutive int8 weight rows (``q[qofs:]``, ``q[qofs + cols:]``) times activation rows
    ``t0 .. t0 + rows``: ``out[w * rows + r]`` is what ``dot8q`` gives weight row ``w`` and
    activation row ``r`` (the same operations a pair, so the same bits). A prompt's or a batch's
    product: each register of activations loaded serves two weight rows, each weight register
    all the rows (with one weight row, 9 loads fed 8 ``vpdpbusd``; now 10 feed 16)."""
    return _dot8q_passes(level, TILE_WEIGHT_ROWS, f"dot8q_tile_{level}")


def make_dot8q_rows(level: str):
    """``dot8q_rows(q, qofs, xq, xs, corr, t0, cols, xblock, out)``: :data:`WEIGHT_ROWS`
    consecutive int8 weight rows (``q[qofs:]``, ``q[qofs + cols:]``, ...) times the one
    activation row ``t0``: ``out[w]`` is what ``dot8q`` gives weight row ``w`` (the same
    operations a row, so the same bits). A token's decode multiplies one row; one weight row
    at a time, each row's sums wait on one chain of dependent ``vpdpbusd`` s and end in a
    horizontal sum, about as long as SmolLM2's 576-value rows take to read. Four rows keep four
    chains in flight and read the activations once for all four."""
    def dot8q_rows(typingctx, q, qofs, xq, xs, corr, t0, cols, xblock, out):
        sig = types.void(q, qofs, xq, xs, corr, t0, cols, xblock, out)

        def codegen(context, builder, signature, args):
            q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, t0_i, cols_i, xblock_i, out_ptr = \
                unpack(context, builder, signature, args)
            _dot8q_pass(Emit(builder, level), q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, t0_i, 1, WEIGHT_ROWS, cols_i,
                        xblock_i, out_ptr)
            return context.get_dummy_value()

        return sig, codegen

    dot8q_rows.__name__ = f"dot8q_rows_{level}"
    return stable_id(intrinsic(dot8q_rows), f"simd.{dot8q_rows.__name__}")


def make_dot8q_row(level: str):
    """``dot8q_row(q, qofs, xq, xs, corr, cols, xblock, out)``: one int8 weight row
    (``q[qofs:]``) times activation row 0, ``out[0]`` what ``dot8q`` gives (the same int32 sums
    of a block, added in another order: the same bits), with no software prefetch. Each block's
    sums run in :data:`ROW_CHAINS` independent chains of ``vpdpbusd``, as four weight rows
    would keep them in flight.

    A token's product on a CPU whose hardware prefetchers follow one stream a thread across
    pages (AMD Zen 4 here) reads its weight one row after another this way faster than four
    rows a pass with prefetch: one stream, not four (:func:`sli.kernels.simd.token_pass_rows`)."""
    def dot8q_row(typingctx, q, qofs, xq, xs, corr, cols, xblock, out):
        sig = types.void(q, qofs, xq, xs, corr, cols, xblock, out)

        def codegen(context, builder, signature, args):
            q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, cols_i, xblock_i, out_ptr = \
                unpack(context, builder, signature, args)
            _dot8q_row(Emit(builder, level), q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, cols_i, xblock_i, out_ptr)
            return context.get_dummy_value()

        return sig, codegen

    dot8q_row.__name__ = f"dot8q_row_{level}"
    return stable_id(intrinsic(dot8q_row), f"simd.{dot8q_row.__name__}")


ROW_CHAINS = 4  # independent int32 sums a block in dot8q_row


def _dot8q_step(e, isum, q_ptr, at_q, xq_ptr, at_x):
    """``isum += `` the products of one register of weight bytes ``q[at_q:]`` by activation
    bytes ``xq[at_x:]`` (:meth:`Emit.dot_bytes`, as :func:`_dot8q_pass` takes them)."""
    b = e.b
    weights = vload(b, q_ptr, at_q, e.vb)
    x = vload(b, xq_ptr, at_x, e.vb)
    unsigned = b.xor(weights, const(e.vb, -128)) if e.level == "avx512" else e.magnitude(weights)
    signed = x if e.level == "avx512" else e.with_sign_of(x, weights)
    b.store(e.dot_bytes(b.load(isum), unsigned, signed), isum)


def _dot8q_row(e, q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, cols_i, xblock_i, out_ptr):
    """A block's sums in :data:`ROW_CHAINS` chains, each step a register of ``e``'s level. On
    AVX-512 each 64-byte step is two 256-bit halves, each half's chain its own: on AMD Zen 4 a
    weight read in 512-bit loads ran up to 1.2x slower than in 256-bit ones when it lay 32-byte
    aligned (docs/benchmarks.md). The halves meet as the block ends, the 16 int32 lanes of a
    512-bit step's sums (exact: the same bits)."""
    b = e.b
    step = 4 * e.w  # bytes a register of the level
    split = e.level == "avx512"
    part = Emit(b, e.level, e.w // 2) if split else e  # what a load and its products take
    parts = (0, step // 2) if split else (0,)
    blocks = b.sdiv(cols_i, xblock_i)
    fsum = cgutils.alloca_once(b, e.vf, zfill=True)
    isum = cgutils.alloca_once(b, e.vi)
    chains = [[cgutils.alloca_once(b, part.vi) for _ in parts] for _ in range(ROW_CHAINS)]

    def add_step(chain, at):
        for s, offset in zip(chain, parts):
            at_s = b.add(at, idx(offset))
            _dot8q_step(part, s, q_ptr, b.add(qofs_i, at_s), xq_ptr, at_s)

    with cgutils.for_range(b, blocks) as block:
        first = b.mul(block.index, xblock_i)
        for chain in chains:
            for s in chain:
                b.store(ir.Constant(part.vi, None), s)
        steps = b.sdiv(xblock_i, idx(step))
        units = b.sdiv(steps, idx(ROW_CHAINS))
        with cgutils.for_range(b, units) as unit:
            at = b.add(first, b.mul(unit.index, idx(step * ROW_CHAINS)))
            for c, chain in enumerate(chains):
                add_step(chain, b.add(at, idx(step * c)))
        done = b.mul(units, idx(ROW_CHAINS))
        with cgutils.for_range(b, b.sub(steps, done)) as rest:  # the block's last steps, in chain 0
            add_step(chains[0], b.add(first, b.mul(b.add(done, rest.index), idx(step))))
        totals = []
        for h in range(len(parts)):
            total = b.load(chains[0][h])
            for chain in chains[1:]:
                total = b.add(total, b.load(chain[h]))
            totals.append(total)
        whole = totals[0] if not split else b.shuffle_vector(
            totals[0], totals[1], ir.Constant(ir.VectorType(I32, e.w), list(range(e.w))))
        b.store(whole, isum)
        _accumulate(e, fsum, isum, splat(b, b.load(b.gep(xs_ptr, [block.index])), e.vf))
    corr = _corr(b, corr_ptr, idx(0)) if e.level == "avx512" else None
    _store_sums(e, out_ptr, [fsum], corr)


def _dot8q_pass(e, q_ptr, qofs_i, xq_ptr, xs_ptr, corr_ptr, t0_i, rows, weight_rows, cols_i, xblock_i, out_ptr):
    """One pass of ``weight_rows`` int8 weight rows by ``rows`` activation rows; weight row
    ``w`` by activation row ``r`` to ``out[w * rows + r]`` (see :func:`make_dot8q`)."""
    b, w = e.b, e.w
    blocks = b.sdiv(cols_i, xblock_i)
    pairs = [(v, r) for v in range(weight_rows) for r in range(rows)]
    fsum = {pair: cgutils.alloca_once(b, e.vf, zfill=True) for pair in pairs}
    isum = {pair: cgutils.alloca_once(b, e.vi) for pair in pairs}
    qrow = [b.add(qofs_i, b.mul(cols_i, idx(v))) for v in range(weight_rows)]
    xrow = [b.mul(b.add(t0_i, idx(r)), cols_i) for r in range(rows)]
    srow = [b.mul(b.add(t0_i, idx(r)), blocks) for r in range(rows)]
    with cgutils.for_range(b, blocks) as block:
        first = b.mul(block.index, xblock_i)
        for pair in pairs:
            b.store(ir.Constant(e.vi, None), isum[pair])
        with cgutils.for_range(b, b.sdiv(xblock_i, idx(4 * w))) as step:
            at_value = b.add(first, b.mul(step.index, idx(4 * w)))
            xv = [vload(b, xq_ptr, b.add(xrow[r], at_value), e.vb) for r in range(rows)]
            for v in range(weight_rows):
                e.prefetch_row(q_ptr, qrow[v], at_value, cols_i, weight_rows)
                weights = vload(b, q_ptr, b.add(qrow[v], at_value), e.vb)
                unsigned = b.xor(weights, const(e.vb, -128)) if e.level == "avx512" else e.magnitude(weights)
                for r in range(rows):
                    signed = xv[r] if e.level == "avx512" else e.with_sign_of(xv[r], weights)
                    b.store(e.dot_bytes(b.load(isum[v, r]), unsigned, signed), isum[v, r])
        for v, r in pairs:
            scale = splat(b, b.load(b.gep(xs_ptr, [b.add(srow[r], block.index)])), e.vf)
            _accumulate(e, fsum[v, r], isum[v, r], scale)
    corr = _corr(b, corr_ptr, t0_i) if e.level == "avx512" else None
    for v in range(weight_rows):
        sums = [fsum[v, r] for r in range(rows)]
        _store_sums(e, b.gep(out_ptr, [idx(v * rows)]), sums, corr)


def make_dot4q(level: str):
    """``dot4q(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out)``: a
    group-wise affine 4-bit row (INT4: ``w = (q - zero) * scale``, ``q`` the nibble) times int8
    activation rows ``xq[(t0 + r)*cols:]``, each 128 values ordered as the 64 even ones then
    the 64 odd ones (:func:`sli.kernels.q4_order`, :func:`sli.kernels.int4_half`; groups of 64
    in a row 128 does not divide: its last 64 as the 32 even ones, then the 32 odd ones; other
    group sizes that are multiples of 64 and not of 128: each 64 values so, read 64 values a
    step), ``gsum`` their sum per group:
    ``out[r] = sum over groups of scale * (q . xq - zero * gsum)``, ``q . xq`` exact in int32.
    ``scales`` are the stored float16 scales' bits (int16), ``zeros`` the stored uint8 zeros.

    The nibbles are unsigned bytes as they are: ``vpdpbusd`` on AVX-512 VNNI, ``vpmaddubsw``
    (15 * 127 * 2 fits 16 bits) and ``vpmaddwd`` on AVX2.
    """
    return _dot4q_passes(level, 1, f"dot4q_{level}")


def make_dot4q_tile(level: str):
    """``dot4q_tile(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out)``:
    :data:`TILE_WEIGHT_ROWS` consecutive INT4 weight rows (as :func:`make_dot4q_rows` finds
    them) times activation rows ``t0 .. t0 + rows``: ``out[w * rows + r]`` is what ``dot4q``
    gives weight row ``w`` and activation row ``r``, the same operations a pair. A prompt's or
    a batch's product: each activation register loaded serves two weight rows (see
    :func:`make_dot8q_tile`)."""
    return _dot4q_passes(level, TILE_WEIGHT_ROWS, f"dot4q_tile_{level}")


def _dot4q_passes(level: str, weight_rows: int, name: str):
    """The intrinsic of :func:`make_dot4q` (``weight_rows`` 1) and :func:`make_dot4q_tile`: each
    pass of activation rows a run-time switch case over ``weight_rows`` weight rows."""
    def dot4q(typingctx, packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out):
        sig = types.void(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, rows, cols, out)

        def codegen(context, builder, signature, args):
            values = unpack(context, builder, signature, args)
            rows_i, cols_i, out_ptr = values[9:]
            rows_switch(builder, level, rows_i,
                        lambda e, rows: _dot4q_pass(e, *values[:9], rows, weight_rows, cols_i, out_ptr))
            return context.get_dummy_value()

        return sig, codegen

    dot4q.__name__ = name
    return stable_id(intrinsic(dot4q), f"simd.{name}")


def make_dot4q_rows(level: str):
    """``dot4q_rows(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, cols, out)``:
    :data:`WEIGHT_ROWS` consecutive INT4 weight rows (``packed[pofs + w * cols // 2:]``, their
    groups from ``sofs + w * cols // group`` on) times the one activation row ``t0``: ``out[w]``
    is what ``dot4q`` gives weight row ``w``, the same operations a row, the activations read
    once for the four and each row prefetched (see :func:`make_dot8q_rows`)."""
    def dot4q_rows(typingctx, packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, cols, out):
        sig = types.void(packed, pofs, scales, zeros, sofs, group, xq, gsum, t0, cols, out)

        def codegen(context, builder, signature, args):
            values = unpack(context, builder, signature, args)
            _dot4q_pass(Emit(builder, level), *values[:9], 1, WEIGHT_ROWS, *values[9:])
            return context.get_dummy_value()

        return sig, codegen

    dot4q_rows.__name__ = f"dot4q_rows_{level}"
    return stable_id(intrinsic(dot4q_rows), f"simd.{dot4q_rows.__name__}")


def _dot4q_pass(e, packed_ptr, pofs_i, scales_ptr, zeros_ptr, sofs_i, group_i, xq_ptr, gsum_ptr, t0_i, rows,
                weight_rows, cols_i, out_ptr):
    """One pass of ``weight_rows`` INT4 weight rows by ``rows`` activation rows; weight row ``v``
    by activation row ``r`` to ``out[v * rows + r]`` (see :func:`make_dot4q`)."""
    b = e.b
    groups = b.sdiv(cols_i, group_i)
    pairs = [(v, r) for v in range(weight_rows) for r in range(rows)]
    fsum = {pair: cgutils.alloca_once(b, e.vf, zfill=True) for pair in pairs}
    fix = {pair: cgutils.alloca_once(b, F32, zfill=True) for pair in pairs}
    isum = {pair: cgutils.alloca_once(b, e.vi) for pair in pairs}
    rows_of = _Int4Rows(
        pairs=pairs, rows=rows,
        packed=[b.add(pofs_i, b.mul(b.lshr(cols_i, idx(1)), idx(v))) for v in range(weight_rows)],
        x=[b.mul(b.add(t0_i, idx(r)), cols_i) for r in range(rows)], cols=cols_i)
    srow = [b.add(sofs_i, b.mul(groups, idx(v))) for v in range(weight_rows)]
    grow = [b.mul(b.add(t0_i, idx(r)), groups) for r in range(rows)]

    def group_scales(g):  # group g's scale in each weight row; its zero point's share added to each pair's fix
        shares = [b.load(b.gep(gsum_ptr, [b.add(grow[r], g)])) for r in range(rows)]
        scales = []
        for v in range(weight_rows):
            at_group = b.add(srow[v], g)  # the scale as stored (float16 bits), the zero a byte
            scale = half_to_float(b, b.load(b.gep(scales_ptr, [at_group])))
            zero_scale = b.fmul(b.uitofp(b.load(b.gep(zeros_ptr, [at_group])), F32), scale)
            for r in range(rows):
                b.store(e.fma(zero_scale, shares[r], b.load(fix[v, r])), fix[v, r])  # the same bits on every path
            scales.append(scale)
        return scales

    with b.if_else(b.icmp_signed("==", group_i, idx(64))) as (by_pairs, by_groups):
        with by_pairs:
            _int4_pairs(e, rows_of, packed_ptr, xq_ptr, isum, fsum, group_scales)
        with by_groups:
            _int4_groups(e, rows_of, packed_ptr, xq_ptr, group_i, groups, isum, fsum, group_scales)
    for v in range(weight_rows):
        _store_sums(e, b.gep(out_ptr, [idx(v * rows)]), [fsum[v, r] for r in range(rows)],
                    lambda r, v=v: b.load(fix[v, r]))


@dataclass
class _Int4Rows:
    """Where a pass's rows start: each weight row's first byte (``packed``), each activation
    row's first value (``x``); the (weight row, activation row) ``pairs`` with sums of their own."""
    pairs: list
    rows: int
    packed: list
    x: list
    cols: ir.Value


def _int4_groups(e, rows_of, packed_ptr, xq_ptr, group_i, groups, isum, fsum, group_scales):
    """:func:`make_dot4q`'s loop a group at a time (every group size but 64, which
    :func:`_int4_pairs` reads): 128 values a step where 128 divides the group, else 64 (192,
    ...)."""
    b, w = e.b, e.w
    with cgutils.for_range(b, groups) as loop:
        g = loop.index
        first = b.mul(g, group_i)
        for pair in rows_of.pairs:
            b.store(ir.Constant(e.vi, None), isum[pair])
        with b.if_else(b.icmp_signed("==", b.and_(group_i, idx(127)), idx(0))) as (by_128, by_64):
            with by_128:  # 128 values (64 bytes) a step
                with cgutils.for_range(b, b.sdiv(group_i, idx(128))) as step:
                    _int4_step128(e, rows_of, packed_ptr, xq_ptr, b.add(first, b.mul(step.index, idx(128))),
                                  [isum] * (64 // (4 * w)))
            with by_64:  # a group of 64s (192, ...): 64 values (32 bytes) a step
                with cgutils.for_range(b, b.sdiv(group_i, idx(64))) as step:
                    _int4_step64(e, rows_of, packed_ptr, xq_ptr, b.add(first, b.mul(step.index, idx(64))), isum)
        scales = group_scales(g)
        for v, r in rows_of.pairs:
            _accumulate(e, fsum[v, r], isum[v, r], splat(b, scales[v], e.vf))


def _int4_prefetch(e, rows_of, packed_ptr, at_value):
    """Each weight row's bytes :data:`sli.kernels.simd_ir.PREFETCH_VALUES` values ahead (past a
    row's end, the same row of the next pass: :meth:`Emit.prefetch_row`)."""
    for row in rows_of.packed:
        e.prefetch_row(packed_ptr, row, at_value, rows_of.cols, len(rows_of.packed), per_byte=2)


def _int4_step128(e, rows_of, packed_ptr, xq_ptr, at_value, sums):
    """128 values (64 bytes) of INT4 from ``at_value``, ``xq`` in :func:`sli.kernels.q4_order`'s
    ``half`` 64 there, in 4w-byte registers (64/(4w) of them): register ``part``'s products
    into each pair's ``sums[part]``; each activation register read once for all weight rows."""
    b, w = e.b, e.w
    _int4_prefetch(e, rows_of, packed_ptr, at_value)
    # the products bound for one sums register, added to it at once (Emit.dot_bytes_sum): on AVX2
    # at most four, the two nibble halves of 64 // (4w) = 2 parts, within its int16 words' bound
    products = {}
    for part, into in enumerate(sums):
        xv = {(half, r): vload(b, xq_ptr, b.add(rows_of.x[r], b.add(at_value, idx(half + part * 4 * w))), e.vb)
              for half in (0, 64) for r in range(rows_of.rows)}
        for v, row in enumerate(rows_of.packed):
            raw = vload(b, packed_ptr, b.add(row, b.add(b.lshr(at_value, idx(1)), idx(part * 4 * w))), e.vb)
            high, low = e.nibbles(raw)
            for nibbles, half in ((high, 0), (low, 64)):
                for r in range(rows_of.rows):
                    products.setdefault((id(into), v, r), (into, []))[1].append((nibbles, xv[half, r]))
    for (_, v, r), (into, terms) in products.items():
        b.store(e.dot_bytes_sum(b.load(into[v, r]), terms), into[v, r])


def _int4_step64(e, rows_of, packed_ptr, xq_ptr, at_value, isum):
    """64 values (32 bytes) of INT4 from ``at_value`` into each pair's ``isum``, ``xq`` in
    :func:`sli.kernels.q4_order`'s ``half`` 32 there."""
    b = e.b
    _int4_prefetch(e, rows_of, packed_ptr, at_value)
    halves = (0,) if e.level == "avx512" else (0, 32)  # AVX-512: both nibbles in one register, as xq holds them
    xv = {(half, r): vload(b, xq_ptr, b.add(rows_of.x[r], b.add(at_value, idx(half))), e.vb)
          for half in halves for r in range(rows_of.rows)}
    for v, row in enumerate(rows_of.packed):
        raw = vload(b, packed_ptr, b.add(row, b.lshr(at_value, idx(1))), ir.VectorType(I8, 32))
        high, low = e.nibbles(raw)
        if e.level == "avx512":
            parts = [(b.shuffle_vector(high, low, ir.Constant(ir.VectorType(I32, 64), list(range(64)))), 0)]
        else:
            parts = [(high, 0), (low, 32)]
        for r in range(rows_of.rows):
            terms = [(nibbles, xv[half, r]) for nibbles, half in parts]
            b.store(e.dot_bytes_sum(b.load(isum[v, r]), terms), isum[v, r])


def _int4_pairs(e, rows_of, packed_ptr, xq_ptr, isum, fsum, group_scales):
    """:func:`make_dot4q`'s loop for groups of 64: two groups a 128-value step, read as groups
    of 128 are (``xq`` in their order), each group's sums in lanes of their own: AVX-512's
    register of 64 bytes holds the first group's in lanes 0-7 and the second's in 8-15, scaled
    by one vector of the two scales; AVX2's two 32-byte registers are a group each, in sums of
    their own. A row's last group, where 128 does not divide the row (576), alone after them
    (:func:`_int4_step64`)."""
    b, w = e.b, e.w
    cols_i = rows_of.cols
    # each register's sums: AVX-512's one holds both groups, AVX2's two one group each
    sums = [isum] if w == 16 else [isum, {pair: cgutils.alloca_once(b, e.vi) for pair in rows_of.pairs}]
    halves = ir.Constant(ir.VectorType(I32, w), [0] * (w // 2) + [1] * (w // 2))
    with cgutils.for_range(b, b.sdiv(cols_i, idx(128))) as loop:
        at_value = b.mul(loop.index, idx(128))
        for into in sums:
            for pair in rows_of.pairs:
                b.store(ir.Constant(e.vi, None), into[pair])
        _int4_step128(e, rows_of, packed_ptr, xq_ptr, at_value, sums)
        first_group = b.mul(loop.index, idx(2))
        firsts, seconds = group_scales(first_group), group_scales(b.add(first_group, idx(1)))
        for v, r in rows_of.pairs:
            if w == 16:
                two = ir.Constant(ir.VectorType(F32, 2), None)
                two = b.insert_element(two, firsts[v], ir.Constant(I32, 0))
                two = b.insert_element(two, seconds[v], ir.Constant(I32, 1))
                _accumulate(e, fsum[v, r], isum[v, r], b.shuffle_vector(two, two, halves))
            else:
                _accumulate(e, fsum[v, r], isum[v, r], splat(b, firsts[v], e.vf))
                _accumulate(e, fsum[v, r], sums[1][v, r], splat(b, seconds[v], e.vf))
    with b.if_then(b.icmp_signed("!=", b.and_(cols_i, idx(127)), idx(0))):  # the last group, alone
        for pair in rows_of.pairs:
            b.store(ir.Constant(e.vi, None), isum[pair])
        last = b.sub(cols_i, idx(64))
        _int4_step64(e, rows_of, packed_ptr, xq_ptr, last, isum)
        scales = group_scales(b.lshr(last, idx(6)))
        for v, r in rows_of.pairs:
            _accumulate(e, fsum[v, r], isum[v, r], splat(b, scales[v], e.vf))


def make_dot4l(level: str):
    """``dot4l(packed, pofs, levels, scales, sofs, blocksize, xq, t0, rows, cols, out)``: a 4-bit
    row whose value is ``L[nibble]`` times its block's float32 scale ``scales[sofs + block]``
    (NF4/FP4, their 16 levels as
    integers ``L = round(code * LEVEL_SCALE)``, held split as ``L = 64 * levels[n] + levels[16 +
    n]``) times int16 activation rows ``xq[(t0 + r)*cols:]`` (int8 values, laid out by
    :func:`sli.kernels.levels_order`): ``out[r] = sum over blocks of scale * (L[q] . xq)``, the
    dot product exact in int32 over each 64 values (scaled by their block's scale as they end;
    the plain level scales a whole block's sum: the same for NF4/FP4's 64); blocks of 32 values
    scale each half of a 64-value step by its own block's scale.

    Each code is looked up as its whole 16-bit level and meets the activations in a signed
    word product that sums pairs into int32 (``|L| * 127 * 2`` fits, and a lane's sums over a
    block of up to 4096 values too), so a row pays one multiply-add (reading memory) each 32
    values and one conversion a block, and the decoding is shared by the rows of a pass:

    - AVX-512: 64 bytes read as 32 words, each word's four codes looked up in four ``vpermw``
      after shifts alone (:func:`_dot4l_pass`), multiplied in ``vpdpwssd`` (VNNI); ``xq`` in
      :func:`sli.kernels.levels_order`'s four-way order (a row's last 64 values, where 128 does
      not divide it, as 32 codes widened to words, in :func:`sli.kernels.q4_order`).
    - AVX2: each code's low and high level byte looked up in two ``vpshufb`` and woven into
      words within each 128-bit lane (``vpunpck{l,h}bw``), multiplied in ``vpmaddwd``; ``xq``
      as the woven words lie (each 32 values of q4_order as their 0-7, 16-23, 8-15, 24-31).

    Earlier each level went as two bytes in two byte products a row (``vpdpbusd`` from a
    ``-128 * sum(xq)`` start; AVX2's ``vpmaddubsw`` with each part's sign moved onto ``xq``):
    2-3x the operations a row (docs/benchmarks.md). (Levels rounded to one byte, llama.cpp
    IQ4_NL's way, moved SmolLM2's NF4 perplexity +0.8%: bitsandbytes' levels are not on an
    int8 grid.)
    """
    return _dot4l_passes(level, 1, f"dot4l_{level}", f"simd.dot4l_words_{level}")


def _dot4l_passes(level: str, weight_rows: int, name: str, id_name: str):
    """The intrinsic of :func:`make_dot4l` (``weight_rows`` 1) and :func:`make_dot4l_tile`: each
    pass of activation rows a run-time switch case over ``weight_rows`` weight rows."""
    def dot4l(typingctx, packed, pofs, levels, scales, sofs, blocksize, xq, t0, rows, cols, out):
        sig = types.void(packed, pofs, levels, scales, sofs, blocksize, xq, t0, rows, cols, out)

        def codegen(context, builder, signature, args):
            packed_ptr, pofs_i, levels_ptr, scales_ptr, sofs_i, bs_i, xq_ptr, t0_i, rows_i, cols_i, out_ptr = \
                unpack(context, builder, signature, args)
            words = _dot4l_words(builder, level, levels_ptr)
            rows_switch(builder, level, rows_i, lambda e, rows: _dot4l_pass(
                e, words, packed_ptr, pofs_i, scales_ptr, sofs_i, bs_i, xq_ptr, t0_i, rows, weight_rows, cols_i,
                out_ptr))
            return context.get_dummy_value()

        return sig, codegen

    dot4l.__name__ = name
    return stable_id(intrinsic(dot4l), id_name)


def make_dot4l_tile(level: str):
    """``dot4l_tile(packed, pofs, levels, scales, sofs, blocksize, xq, t0, rows, cols, out)``:
    :data:`TILE_WEIGHT_ROWS` consecutive 4-bit weight rows (as :func:`make_dot4l_rows` finds
    them) times activation rows ``t0 .. t0 + rows``: ``out[w * rows + r]`` is what ``dot4l``
    gives weight row ``w`` and activation row ``r``, the same operations a pair (see
    :func:`make_dot8q_tile`)."""
    return _dot4l_passes(level, TILE_WEIGHT_ROWS, f"dot4l_tile_{level}", f"simd.dot4l_tile_words_{level}")


def make_dot4l_rows(level: str):
    """``dot4l_rows(packed, pofs, levels, scales, sofs, blocksize, xq, t0, cols, out)``:
    :data:`WEIGHT_ROWS` consecutive 4-bit weight rows (``packed[pofs + w * cols // 2:]``,
    their blocks from ``sofs + w * cols // blocksize`` on) times the one activation
    row ``t0``: ``out[w]`` is what ``dot4l`` gives weight row ``w``, the same operations a row
    (see :func:`make_dot8q_rows`)."""
    def dot4l_rows(typingctx, packed, pofs, levels, scales, sofs, blocksize, xq, t0, cols, out):
        sig = types.void(packed, pofs, levels, scales, sofs, blocksize, xq, t0, cols, out)

        def codegen(context, builder, signature, args):
            packed_ptr, pofs_i, levels_ptr, scales_ptr, sofs_i, bs_i, xq_ptr, t0_i, cols_i, out_ptr = \
                unpack(context, builder, signature, args)
            words = _dot4l_words(builder, level, levels_ptr)
            _dot4l_pass(Emit(builder, level), words, packed_ptr, pofs_i, scales_ptr, sofs_i, bs_i, xq_ptr, t0_i, 1,
                        WEIGHT_ROWS, cols_i, out_ptr)
            return context.get_dummy_value()

        return sig, codegen

    dot4l_rows.__name__ = f"dot4l_rows_{level}"
    return stable_id(intrinsic(dot4l_rows), f"simd.dot4l_rows_{level}")


def make_dot4l_row(level: str):
    """``dot4l_row(packed, pofs, levels, scales, sofs, blocksize, xq, cols, out)``: ``dot4l``
    of one weight row by activation row 0, with no software prefetch (see
    :func:`make_dot8q_row`): the same operations, the same bits."""
    def dot4l_row(typingctx, packed, pofs, levels, scales, sofs, blocksize, xq, cols, out):
        sig = types.void(packed, pofs, levels, scales, sofs, blocksize, xq, cols, out)

        def codegen(context, builder, signature, args):
            packed_ptr, pofs_i, levels_ptr, scales_ptr, sofs_i, bs_i, xq_ptr, cols_i, out_ptr = \
                unpack(context, builder, signature, args)
            words = _dot4l_words(builder, level, levels_ptr)
            _dot4l_pass(Emit(builder, level), words, packed_ptr, pofs_i, scales_ptr, sofs_i, bs_i, xq_ptr, idx(0), 1,
                        1, cols_i, out_ptr, prefetch=False)
            return context.get_dummy_value()

        return sig, codegen

    dot4l_row.__name__ = f"dot4l_row_{level}"
    return stable_id(intrinsic(dot4l_row), f"simd.dot4l_row_{level}")


def _dot4l_words(b, level, levels_ptr):
    """The level's ``(decode, multiply)`` over the 16 levels at ``levels_ptr`` (split in two bytes)."""
    # IR types made here, not in a closure: a printed type pickles differently (sli.kernels.simd_ir),
    # so a closure's would change numba's cache key on first use
    v16b, half = ir.VectorType(I8, 16), ir.VectorType(I16, 16)
    high16 = b.sext(vload(b, levels_ptr, idx(0), v16b), half)
    whole = b.add(b.shl(high16, const(half, 6)), b.sext(vload(b, levels_ptr, idx(16), v16b), half))
    return (_words_avx512 if level == "avx512" else _words_avx2)(b, whole)


def _dot4l_pass(e, words, packed_ptr, pofs_i, scales_ptr, sofs_i, bs_i, xq_ptr, t0_i, rows, weight_rows, cols_i,
                out_ptr, prefetch=True):
    """One pass of ``weight_rows`` 4-bit weight rows by ``rows`` activation rows; weight row
    ``w`` by activation row ``r`` to ``out[w * rows + r]`` (see :func:`make_dot4l`).

    A step reads 32 bytes (64 values, ``decode``) or, where the level gives a ``decode_chunk``
    (AVX-512), 64 bytes (128 values decoded in four ``vpermw`` and three shifts, the activations
    in :func:`sli.kernels.levels_order`'s four-way order), a row's last 64 values (576 = 4 * 128 +
    64) then taking the 64-value step. Each step's int32 sums are scaled by the block's scale of
    each 64 values (a 128-value step's low 8 lanes hold its first 64, the high 8 the next); a
    value's block is a shift by log2(blocksize), a power of two from 64: one loop for every size.
    Blocks of 32 values take each 32 values' scale instead, four or two of them read in one load
    (a run-time branch a step; no lane's sums straddle 32 values in any decode's order)."""
    b = e.b
    decode, multiply, decode_chunk = words
    v32, v64, halves = ir.VectorType(I8, 32), ir.VectorType(I8, 64), ir.VectorType(F32, 2)
    pairs = [(v, r) for v in range(weight_rows) for r in range(rows)]
    fsum = {pair: cgutils.alloca_once(b, e.vf, zfill=True) for pair in pairs}
    isum = {pair: cgutils.alloca_once(b, e.vi) for pair in pairs}
    blocks = b.sdiv(cols_i, bs_i)
    prow = [b.add(pofs_i, b.mul(b.lshr(cols_i, idx(1)), idx(v))) for v in range(weight_rows)]
    srow = [b.add(sofs_i, b.mul(blocks, idx(v))) for v in range(weight_rows)]
    xrow = [b.mul(b.add(t0_i, idx(r)), cols_i) for r in range(rows)]
    two_halves = ir.Constant(ir.VectorType(I32, 16), [0] * 8 + [1] * 8)
    bs_log2 = b.cttz(bs_i, ir.Constant(ir.IntType(1), 1))
    blocks_of_32 = b.icmp_signed("==", bs_i, idx(32))

    def scale(v, value):
        return b.load(b.gep(scales_ptr, [b.add(srow[v], b.lshr(value, bs_log2))]))

    def factor_of_64(v, first, width):
        """Blocks of 64 values or more: one scale for each 64 of the step."""
        if width == 64:
            return splat(b, scale(v, first), e.vf)
        pair = b.insert_element(ir.Constant(halves, None), scale(v, first), ir.Constant(I32, 0))
        pair = b.insert_element(pair, scale(v, b.add(first, idx(64))), ir.Constant(I32, 1))
        return b.shuffle_vector(pair, pair, two_halves)

    def factor_of_32(v, first, width):
        """Blocks of 32 values: the step's width / 32 scales, side by side in ``scales``. Lane
        ``j`` of a step's sums holds values ``j * width / w`` on (each decode keeps them so)."""
        found = vload(b, scales_ptr, b.add(srow[v], b.lshr(first, idx(5))), ir.VectorType(F32, width // 32))
        lanes = [j * (width // e.w) // 32 for j in range(e.w)]
        return b.shuffle_vector(found, found, ir.Constant(ir.VectorType(I32, e.w), lanes))

    def factor(v, first, width):
        with b.if_else(blocks_of_32) as (of_32, of_64):
            with of_32:
                small, small_from = factor_of_32(v, first, width), b.block
            with of_64:
                large, large_from = factor_of_64(v, first, width), b.block
        chosen = b.phi(e.vf)
        chosen.add_incoming(small, small_from)
        chosen.add_incoming(large, large_from)
        return chosen

    def decoded(v, first, width):
        at_byte = b.add(prow[v], b.lshr(first, idx(1)))
        if prefetch:
            e.prefetch_row(packed_ptr, prow[v], first, cols_i, weight_rows, per_byte=2)
        raw = vload(b, packed_ptr, at_byte, v64 if width == 128 else v32)
        return list((decode_chunk if width == 128 else decode)(raw))

    def step(first, width):
        for pair in pairs:
            b.store(ir.Constant(e.vi, None), isum[pair])
        if rows > 1:  # several activation rows: each row's values read once, its sums scaled at once
            words_of = [decoded(v, first, width) for v in range(weight_rows)]
            scaled = [factor(v, first, width) for v in range(weight_rows)]
            for r in range(rows):
                for i, (weights, offset) in enumerate(words_of[0]):
                    xv = vload(b, xq_ptr, b.add(xrow[r], b.add(first, idx(offset))), weights.type)
                    for v in range(weight_rows):
                        b.store(multiply(b.load(isum[v, r]), words_of[v][i][0], xv), isum[v, r])
                for v in range(weight_rows):
                    _accumulate(e, fsum[v, r], isum[v, r], scaled[v])
            return
        xv = {}
        for v in range(weight_rows):
            for weights, offset in decoded(v, first, width):
                for r in range(rows):
                    if (r, offset) not in xv:
                        xv[r, offset] = vload(b, xq_ptr, b.add(xrow[r], b.add(first, idx(offset))), weights.type)
                    b.store(multiply(b.load(isum[v, r]), weights, xv[r, offset]), isum[v, r])
        for v in range(weight_rows):
            scaled = factor(v, first, width)
            for r in range(rows):
                _accumulate(e, fsum[v, r], isum[v, r], scaled)

    if decode_chunk is None:
        with cgutils.for_range(b, b.lshr(cols_i, idx(6))) as loop:
            step(b.mul(loop.index, idx(64)), 64)
    else:
        with cgutils.for_range(b, b.lshr(cols_i, idx(7))) as loop:
            step(b.mul(loop.index, idx(128)), 128)
        with b.if_then(b.icmp_signed("!=", b.and_(cols_i, idx(127)), idx(0))):
            step(b.sub(cols_i, idx(64)), 64)
    for v in range(weight_rows):
        _store_sums(e, b.gep(out_ptr, [idx(v * rows)]), [fsum[v, r] for r in range(rows)])


def _words_avx512(b, whole):
    """AVX-512's ``(decode, multiply, decode_chunk)`` for :func:`make_dot4l`: ``decode(codes)``
    gives the 64 values of 32 packed bytes as two registers of 32 levels (the even values, then
    the odd ones) with their offsets in ``xq``; ``decode_chunk(codes)`` the 128 values of 64
    packed bytes as four registers, register ``m`` the values ``4i + m`` (at ``32 * m`` in
    ``xq``); ``multiply(acc, weights, xv)`` is ``vpdpwssd`` (:meth:`Emit.instruction`: LLVM would
    split it in two).

    ``vpermw`` reads an index's low 5 bits and the table holds the 16 levels twice, so a word's
    bits above its lowest nibble need no mask: 64 bytes read as 32 words give their four
    nibbles by shifts of 4, 0, 12 and 8 alone (a byte's first value is its high nibble)."""
    words = ir.VectorType(I16, 32)
    e = Emit(b, "avx512")
    table = b.shuffle_vector(whole, whole, ir.Constant(ir.VectorType(I32, 32), [k % 16 for k in range(32)]))
    permw = e.fn("llvm.x86.avx512.permvar.hi.512", words, [words, words])

    def decode(raw):
        codes = b.zext(raw, words)
        return ((b.call(permw, [table, b.lshr(codes, const(words, 4))]), 0), (b.call(permw, [table, codes]), 32))

    def decode_chunk(raw):
        codes = b.bitcast(raw, words)
        shifted = [b.lshr(codes, const(words, bits)) if bits else codes for bits in (4, 0, 12, 8)]
        return [(b.call(permw, [table, index]), 32 * m) for m, index in enumerate(shifted)]

    def multiply(acc, weights, xv):
        return e.instruction("vpdpwssd", acc, b.bitcast(weights, e.vi), b.bitcast(xv, e.vi))

    return decode, multiply, decode_chunk


def _words_avx2(b, whole):
    """AVX2's ``(decode, multiply, None)`` for :func:`make_dot4l`: four registers of 16 levels,
    each code's low and high level byte looked up (``vpshufb``) and woven into words within
    each lane; ``multiply`` is ``vpmaddwd`` and an add."""
    v32 = ir.VectorType(I8, 32)
    words = ir.VectorType(I16, 16)
    e = Emit(b, "avx2")

    def lane_table(byte):  # the 16 levels' low or high byte, in each 128-bit lane
        part = b.trunc(b.ashr(whole, const(words, 8)) if byte else whole, ir.VectorType(I8, 16))
        return b.shuffle_vector(part, part, ir.Constant(ir.VectorType(I32, 32), [k % 16 for k in range(32)]))

    tables = (lane_table(0), lane_table(1))
    pshufb = e.fn("llvm.x86.avx2.pshuf.b", v32, [v32, v32])
    pmaddwd = e.fn("llvm.x86.avx2.pmadd.wd", e.vi, [words, words])

    def woven(low_bytes, high_bytes, h):  # vpunpck{l,h}bw: each lane's bytes 8h..8h+7 as words
        order = [16 * (k // 16) + 8 * h + k % 16 // 2 + (32 if k % 2 else 0) for k in range(32)]
        return b.bitcast(b.shuffle_vector(low_bytes, high_bytes, ir.Constant(ir.VectorType(I32, 32), order)), words)

    def decode(raw):
        high, low = e.nibbles(raw)
        out = []
        for index, half in ((high, 0), (low, 32)):
            low_bytes, high_bytes = (b.call(pshufb, [table, index]) for table in tables)
            out += [(woven(low_bytes, high_bytes, h), half + 16 * h) for h in (0, 1)]
        return out

    def multiply(acc, weights, xv):
        return b.add(acc, b.call(pmaddwd, [weights, xv]))

    return decode, multiply, None  # no 64-byte step: 32 bytes a step


