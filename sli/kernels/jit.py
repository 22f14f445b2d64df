"""How the kernels are compiled: numba's options and the ids that keep its on-disk cache valid.

numba's cache (``cache=True``: compiled once per machine and SIMD level, then loaded from
``__pycache__``) keys a function by its bytecode and its closure, pickled, and stamps it with
its own source file; a function in another file that it calls is not part of the key. So the
kernels reach every helper through their closure (each ``build`` imports or builds its helpers
inside, never as module globals), and every helper a closure holds carries a
:func:`stable_id` that names it and :data:`SOURCE_HASH`: a change to any file of this package
gives new ids (one compile), an unchanged package loads in every process.
"""
import hashlib
import os

from numba import njit

# The kernels: float32 sums in any order (fastmath), callable from worker threads (nogil).
KERNEL = njit(fastmath=True, cache=True, nogil=True)
# Kernels that reach one output row by more than one code path (a token's 4-weight-row passes and
# the one-row pass after them): without fastmath no LLVM release may reorder the sums of one path
# and not the other (llvmlite 0.43's did: the last bit of a bfloat16 row then depended on how a
# product's rows were split across threads). Their inner loops are the SIMD helpers' own IR.
STRICT_KERNEL = njit(cache=True, nogil=True)


def _package_hash() -> str:
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


SOURCE_HASH = _package_hash()


def stable_id(obj, name: str):
    """Give a numba intrinsic or dispatcher the id ``name`` (plus :data:`SOURCE_HASH`) before
    anything pickles it.

    An intrinsic or a jitted function in a closure pickles as a random id unless given one, so
    each process would compile the kernel again. ``name`` tells helpers apart (and SIMD levels:
    "simd.lut4_avx512"); the hash keeps the cache apart across versions of the package.
    """
    obj._set_uuid(f"sli:{name}:{SOURCE_HASH}")
    return obj
