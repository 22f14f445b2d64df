"""Atomic operations on an int64 array, a spin-wait hint, a cycle counter and a typed pointer
from an address, as numba intrinsics (numba has none of them): what :mod:`sli.kernels.team`'s
threads hand work to each other with, without the GIL.

Every operation is sequentially consistent (x86's ``lock`` instructions, ``xchg`` for a
store); loads are acquire loads, which LLVM keeps inside a spin loop (a plain load of an
array element it may hoist out of the loop and spin forever).
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import stable_id

I64 = ir.IntType(64)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _element(context, builder, array_type, array, index):
    """A pointer to ``array[index]`` (an int64 array)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


@intrinsic
def load(typingctx, array, index):
    """``array[index]``, an acquire load."""
    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element(context, builder, array, args[0], args[1]), "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def store(typingctx, array, index, value):
    """``array[index] = value``, sequentially consistent."""
    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(value, _element(context, builder, array, args[0], args[1]), "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def add(typingctx, array, index, value):
    """``array[index] += value``; returns the value before."""
    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", _element(context, builder, array, args[0], args[1]), value, "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def swap_if(typingctx, array, index, expected, value):
    """``array[index] = value`` if it holds ``expected``; returns whether it did."""
    def codegen(context, builder, signature, args):
        expected = context.cast(builder, args[2], signature.args[2], types.int64)
        value = context.cast(builder, args[3], signature.args[3], types.int64)
        pair = builder.cmpxchg(_element(context, builder, array, args[0], args[1]), expected, value, "seq_cst",
                               "seq_cst")
        return builder.extract_value(pair, 1)

    return types.boolean(array, index, expected, value), codegen


@intrinsic
def pause(typingctx):
    """A spin-wait hint (x86 ``pause``: the core lets its sibling run, and leaves the loop
    without a pipeline flush); nothing elsewhere."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (``rdtsc`` on x86): time in a spin loop without a system call."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def pointer(typingctx, address, dtype):
    """The address ``address`` (an int64) as a pointer to ``dtype`` values, for
    ``numba.carray``."""
    pointer_type = types.CPointer(dtype.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, dtype), codegen


for _f in (load, store, add, swap_if, pause, cycles, pointer):
    stable_id(_f, f"atomics.{_f.__name__}:{int(_X86)}")
