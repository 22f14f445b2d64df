"""LLVM IR building blocks for the SIMD helpers (:mod:`sli.kernels.simd`): each level's
registers, the vector operations the helpers share, and the pass over a weight row that keeps
each activation row's sums in registers.

This is the module that reaches into numba's and llvmlite's internals (``numba.core.cgutils``,
LLVM IR, x86 intrinsics by name); :mod:`sli.kernels.dispatch` imports it, through
:mod:`sli.kernels.simd`, inside a guard.
"""
from __future__ import annotations

from typing import Tuple

from llvmlite import binding, ir
from numba import types
from numba.core import cgutils

# Inline assembly (Emit.instruction) is parsed when numba emits the object code: LLVM needs the
# host's assembly parser for that, which numba does not set up.
binding.initialize_native_asmparser()

# Best first. What each level needs from the CPU (llvmlite's feature names).
LEVELS: Tuple[str, ...] = ("avx512", "avx2")
# F16C: INT4's scales are read as stored, in float16 (every AVX2 CPU has it)
NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni", "avx2", "fma", "f16c"),
         "avx2": ("avx2", "fma", "f16c")}
WIDTH = {"avx512": 16, "avx2": 8}  # float32 lanes a register
# Activation rows one pass over a weight row multiplies: their sums stay in registers (32
# on AVX-512, 16 on AVX2).
MAX_ROWS = {"avx512": 8, "avx2": 4}

F32, I32, I16, I8, I64 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(8), ir.IntType(64)
# A type caches its text once printed, and the text is part of its pickle: of numba's cache key,
# through the helpers that name these types, for every kernel. Printed now, they pickle the same
# before and after the first compile (else a process's first kernel would never load from the cache).
for _type in (F32, I32, I16, I8, I64):
    str(_type)


def unpack(context, builder, signature, args, floats=()):
    """An intrinsic's arguments as IR values: an array's data pointer, a number as intp, or as
    float32 at the positions in ``floats``."""
    values = []
    for at, (value, kind) in enumerate(zip(args, signature.args)):
        if isinstance(kind, types.Array):
            values.append(context.make_array(kind)(context, builder, value).data)
        else:
            values.append(context.cast(builder, value, kind, types.float32 if at in floats else types.intp))
    return values


# How far ahead of a weight row's reading the helpers ask for its bytes (prefetcht0), in values:
# 2048 (1 KB of 4-bit codes, 2 KB of int8). Without it a 1-row product of a weight in DRAM ran
# at ~7.5 GB/s a core (the hardware prefetchers restart at each 4 KB page); with it INT8 reads
# ~19 GB/s on 2 cores (what torch's own sum reaches) and NF4 decodes ~1.4x faster
# (docs/benchmarks.md; Intel Xeon VMs). On an L2/L3-resident weight it changes nothing
# measurable. On AMD Zen 4 and later a token's INT8 and NF4/FP4 passes leave it out (sli.kernels.simd.token_pass_rows).
PREFETCH_VALUES = 2048


def vload(builder, pointer, index, vector_type):
    return builder.load(builder.bitcast(builder.gep(pointer, [index]), vector_type.as_pointer()), align=1)


def vstore(builder, value, pointer, index):
    builder.store(value, builder.bitcast(builder.gep(pointer, [index]), value.type.as_pointer()), align=1)


def half_to_float(builder, bits):
    """A float16's bits (i16) as its float32 value, exact (``vcvtph2ps``: F16C, in :data:`NEEDS`)."""
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())


def splat(builder, scalar, vector_type):
    lanes = vector_type.count
    one = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))


def const(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def idx(value: int):
    """An i64 constant (an index or offset)."""
    return ir.Constant(I64, value)


class Emit:
    """IR for one level: its vector types, lookups, byte dot products and reductions."""

    def __init__(self, builder, level: str, lanes: int = 0):
        """``lanes``: float32 lanes a register, where not the level's own (8: AVX-512's
        instructions on 256-bit registers)."""
        self.b = builder
        self.level = level
        self.w = lanes or WIDTH[level]
        self.vf = ir.VectorType(F32, self.w)
        self.vi = ir.VectorType(I32, self.w)
        self.vb = ir.VectorType(I8, 4 * self.w)  # the bytes of a register
        self.v16 = ir.VectorType(I16, 2 * self.w)

    def fn(self, name, ret, args):
        return cgutils.get_or_insert_function(self.b.module, ir.FunctionType(ret, args), name)

    def instruction(self, mnemonic, acc, a, c):
        """``acc = mnemonic(acc, a, c)`` as that one instruction (AT&T order: ``mnemonic c, a,
        acc``), vectors of ``acc``'s type, which LLVM cannot rewrite into others.

        LLVM 22 (llvmlite 0.50) turns ``llvm.x86.avx512.vpdpwssd.512`` into ``vpmaddwd`` +
        ``vpaddd`` on this Xeon: two operations where one does, in the several-row products
        whose many independent sums leave the multiply port the bound (docs/benchmarks.md)."""
        asm = ir.InlineAsm(ir.FunctionType(acc.type, [acc.type] * 3), f"{mnemonic} $3, $2, $0", "=v,0,v,v")
        return self.b.call(asm, [acc, a, c])

    def prefetch_row(self, pointer, row_start, at_value, cols, weight_rows, per_byte=1):
        """Prefetch weight row ``row_start``'s bytes :data:`PREFETCH_VALUES` values ahead of
        value ``at_value``; past the row's end, the same row of the next pass of
        ``weight_rows`` rows (the rows lie one after another), so a pass's first bytes were
        asked for during the pass before. ``per_byte``: values a byte (2 for 4-bit codes)."""
        b = self.b
        ahead = b.add(at_value, idx(PREFETCH_VALUES))
        past = b.icmp_signed(">=", ahead, cols)
        ahead = b.select(past, b.add(ahead, b.mul(cols, idx(weight_rows - 1))), ahead)
        self.prefetch(pointer, b.add(row_start, b.lshr(ahead, idx(per_byte - 1)) if per_byte > 1 else ahead))

    def prefetch(self, pointer, index):
        """Ask for the cache line at ``pointer[index]`` ahead of its use (``prefetcht0``)."""
        b = self.b
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        b.call(self.fn("llvm.prefetch.p0i8", ir.VoidType(), [i8p, i32, i32, i32]),
               [b.bitcast(b.gep(pointer, [index]), i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])

    def fma(self, a, x, acc):
        """``a * x + acc`` rounded once, whatever LLVM's fast-math options (the level's float
        registers, or float32 scalars)."""
        kind = acc.type
        name = "llvm.fma.f32" if kind == F32 else f"llvm.fma.v{kind.count}f32"
        return self.b.call(self.fn(name, kind, [kind] * 3), [a, x, acc])

    def table(self, code_ptr):
        """The 16 float levels at ``code_ptr`` as a table :meth:`lookup` reads."""
        if self.w == 16:
            return (vload(self.b, code_ptr, idx(0), self.vf),)
        return vload(self.b, code_ptr, idx(0), self.vf), vload(self.b, code_ptr, idx(8), self.vf)

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
        bit3 = b.shl(index, const(self.vi, 28))  # bit 3 to the sign: a vblendvps
        return b.select(b.icmp_signed("<", bit3, const(self.vi, 0)), high, low)

    def hsum(self, vector):
        b = self.b
        lanes = self.w
        while lanes > 1:
            lanes //= 2
            low = b.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, lanes), list(range(lanes))))
            high = b.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(I32, lanes), list(range(lanes, 2 * lanes))))
            vector = b.fadd(low, high)
        return b.extract_element(vector, ir.Constant(I32, 0))

    def nibbles(self, raw):
        """The high and the low nibbles of bytes ``raw``, each as a byte."""
        b = self.b
        halves = ir.VectorType(I16, raw.type.count // 2)
        low = b.and_(raw, const(raw.type, 15))
        high = b.and_(b.bitcast(b.lshr(b.bitcast(raw, halves), const(halves, 4)), raw.type), const(raw.type, 15))
        return high, low

    def dot_bytes(self, acc, u, s):
        """``acc`` (int32 lanes) plus, in each lane, the sum of 4 neighbouring products of
        unsigned bytes ``u`` by signed bytes ``s``: AVX-512 VNNI's ``vpdpbusd``; on AVX2
        ``vpmaddubsw`` (pairs into int16, saturating: the caller keeps them in range) and
        ``vpmaddwd`` by 1."""
        return self.dot_bytes_sum(acc, [(u, s)])

    def dot_bytes_sum(self, acc, products):
        """``acc`` plus :meth:`dot_bytes`'s sums of each ``(u, s)`` in ``products``: on AVX-512 a
        chain of ``vpdpbusd``; on AVX2 the pairs' int16 sums are added as words first and widened
        once (``vpmaddwd`` by 1), one multiply-add and one add for them all, not one each. The
        caller keeps every word's total within int16: INT4's nibbles by int8 activations,
        2 * 15 * 128 a pair, four pairs."""
        b = self.b
        if self.level == "avx512":
            dp = self.fn(f"llvm.x86.avx512.vpdpbusd.{32 * self.w}", self.vi, [self.vi] * 3)
            for u, s in products:
                acc = b.call(dp, [acc, b.bitcast(u, self.vi), b.bitcast(s, self.vi)])
            return acc
        madd = self.fn("llvm.x86.avx2.pmadd.ub.sw", self.v16, [self.vb, self.vb])
        words = None
        for u, s in products:
            pairs = b.call(madd, [u, s])
            words = pairs if words is None else b.add(words, pairs)
        return b.add(acc, b.call(self.fn("llvm.x86.avx2.pmadd.wd", self.vi, [self.v16] * 2),
                                 [words, const(self.v16, 1)]))

    def magnitude(self, v):
        """``|v|`` of signed bytes (AVX2 multiplies signed by signed bytes as ``|w|`` by ``x``
        with ``w``'s sign: :meth:`with_sign_of`)."""
        return self.b.call(self.fn(f"llvm.abs.v{4 * self.w}i8", self.vb, [self.vb, ir.IntType(1)]),
                           [v, ir.Constant(ir.IntType(1), 0)])

    def with_sign_of(self, x, w):
        """``x`` negated where ``w`` < 0, zero where ``w`` = 0 (``vpsignb``, AVX2)."""
        return self.b.call(self.fn("llvm.x86.avx2.psign.b", self.vb, [self.vb, self.vb]), [x, w])


def rows_switch(builder, level, rows_value, case):
    """Emit ``case(e, rows)`` for each ``rows`` in 1..MAX_ROWS[level], switched on
    ``rows_value`` (the activation rows of this call) at run time: code for a known number of
    rows keeps each row's sums in registers."""
    b = builder
    done = b.append_basic_block("rows.done")
    switch = b.switch(rows_value, done)
    for rows in range(1, MAX_ROWS[level] + 1):
        block = b.append_basic_block(f"rows.{rows}")
        switch.add_case(ir.Constant(rows_value.type, rows), block)
        with b.goto_block(block):
            case(Emit(b, level), rows)
            b.branch(done)
    b.position_at_end(done)


def _chains(rows: int) -> int:
    # independent sums a row: an FMA's result is ready 4 cycles later and two start a cycle
    return max(1, 4 // rows)


def row_pass(builder, level, n, block, x_ptr, xofs, stride, rows_value, out_ptr, begin_block, body):
    """Emit the loop over ``n`` values of a weight row (blocks of ``block`` values, 64 at a
    time) that meets float32 activation rows, and the store of each row's sum to ``out[r]``.

    ``begin_block(e, index)`` emits what a block needs first (its table). ``body(e, unit,
    multiply)`` emits one 64-value step at value offset ``unit``: it calls ``multiply(vector,
    xoffset)`` for each register of decoded weights, whose values meet
    ``x[xofs + r*stride + xoffset :][:lanes]`` in each row ``r``.
    """
    b = builder

    def case(e, rows):
        chains = _chains(rows)
        sums = [[cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(chains)] for _ in range(rows)]
        count = [0]

        def multiply(vector, xoffset):
            chain = count[0] % chains
            count[0] += 1
            for r in range(rows):
                xv = vload(b, x_ptr, b.add(b.add(xofs, b.mul(stride, idx(r))), xoffset), e.vf)
                b.store(e.fma(vector, xv, b.load(sums[r][chain])), sums[r][chain])

        with cgutils.for_range(b, b.sdiv(n, block)) as outer:
            first = b.mul(outer.index, block)
            begin_block(e, outer.index)
            with cgutils.for_range(b, b.sdiv(block, idx(64))) as inner:
                body(e, b.add(first, b.mul(inner.index, idx(64))), multiply)
        for r in range(rows):
            total = b.load(sums[r][0])
            for chain in range(1, chains):
                total = b.fadd(total, b.load(sums[r][chain]))
            b.store(e.hsum(total), b.gep(out_ptr, [idx(r)]))

    rows_switch(b, level, rows_value, case)


def weight_rows_pass(builder, level, n, x_ptr, xofs, weight_rows, out_ptr, body):
    """:func:`row_pass` for ``weight_rows`` weight rows by one activation row (a token's
    decode): ``body(e, unit, multiply, v)`` emits weight row ``v``'s 64-value step at
    ``unit``; row ``v``'s sum goes to ``out[v]``. Each row keeps the chains and the order of
    sums of a one-row :func:`row_pass`, so its sum has the same bits; the rows' chains are in
    flight together and the activations are read once for all of them."""
    b = builder
    e = Emit(b, level)
    chains = _chains(1)
    sums = [[cgutils.alloca_once(b, e.vf, zfill=True) for _ in range(chains)] for _ in range(weight_rows)]
    loaded = {}

    def multiply_for(v):
        count = [0]

        def multiply(vector, xoffset):
            chain = count[0] % chains
            count[0] += 1
            key = count[0]  # the same offset for every weight row: the activations once
            if key not in loaded:
                loaded[key] = vload(b, x_ptr, b.add(xofs, xoffset), e.vf)
            b.store(e.fma(vector, loaded[key], b.load(sums[v][chain])), sums[v][chain])

        return multiply

    with cgutils.for_range(b, b.sdiv(n, idx(64))) as step:
        loaded.clear()
        unit = b.mul(step.index, idx(64))
        for v in range(weight_rows):
            body(e, unit, multiply_for(v), v)
    for v in range(weight_rows):
        total = b.load(sums[v][0])
        for chain in range(1, chains):
            total = b.fadd(total, b.load(sums[v][chain]))
        b.store(e.hsum(total), b.gep(out_ptr, [idx(v)]))
