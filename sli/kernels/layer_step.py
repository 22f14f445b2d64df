"""A decoder layer's one-token step as one compiled call (:class:`sli.decode_step.DecodeStep`).

Called op by op from Python, a layer's step is ~15 kernel calls and the Python between them:
on SmolLM2-135M ~300 µs a layer around ~450 µs of products, most of it Python running with
caches the products have just flushed (docs/benchmarks.md). Here the whole step is one numba
function: RMSNorm, the int8 activations, q/k/v (each led on the kernel team, or run on this
thread below its threshold, as :func:`sli.kernels.dispatch.run` decides), the rotary
embedding, the key and value written into the compact KV buffers, attention over them, o,
the second norm, gate/up, SiLU, down and the residual adds. Every piece is the same kernel the
op-by-op step calls with the same arguments, so the output is the same, bit for bit.

The arguments are tuples built once per layer (:mod:`sli.decode_step`): the products as
``(kind, count, work, bias, outlier columns, their weights, kernel arguments)`` with their activation and output buffers,
the activation forms as the buffers :func:`quantize` fills. ``stage`` 1 stops before
attention and 2 starts after it, for a context long enough that attention should be split
across threads (:func:`sli.kernels.decode_attention_arrays`) between the two calls.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

_built: Dict[str, object] = {}


def build(kernels: dict, lead, level: str, variant: str = ""):
    """The compiled ``step`` over the kernels built for ``level`` and ``variant``
    (:func:`sli.kernels.dispatch.variant`) and the team's ``lead``, built once a process."""
    key = level + variant  # the helpers' variant (sli.kernels.simd): other kernels, other code
    if key not in _built:
        _built[key] = _build(kernels, lead, level, variant)
    return _built[key]


def _store(x, heads, data, scale, position):  # (compiled only: see the overload in _build)
    raise NotImplementedError


def _attend(q, k, kscale, v, vscale, bias, length, scaling, out, start, stop):  # (compiled only)
    raise NotImplementedError


def _build(kernels: dict, lead, level: str, variant: str = ""):
    from numba import njit, types
    from numba.extending import overload

    from .jit import stable_id

    quantize_rows, rms_norm, add_rms_norm, add, rotate, silu_mul = (
        kernels[name] for name in ("quantize_rows", "rms_norm", "add_rms_norm", "add", "rotate", "silu_mul"))
    store_int8, store_bf16, add_columns = kernels["store_int8"], kernels["store_bf16"], kernels["add_columns"]
    attend_int8, attend_bf16 = kernels["decode_attention_int8"], kernels["decode_attention_bf16"]
    compiled = njit(nogil=True, cache=True)

    @overload(_store, jit_options={"nogil": True})
    def _store_overload(x, heads, data, scale, position):
        # one position of keys or values, in the buffer's dtype (int8 with a scale, or bfloat16 bits)
        if isinstance(data, types.Array) and data.dtype == types.int8:
            return lambda x, heads, data, scale, position: store_int8(x, heads, data, scale, position)
        return lambda x, heads, data, scale, position: store_bf16(x, heads, data, position)

    @overload(_attend, jit_options={"nogil": True})
    def _attend_overload(q, k, kscale, v, vscale, bias, length, scaling, out, start, stop):
        kernel = attend_int8 if isinstance(k, types.Array) and k.dtype == types.int8 else attend_bf16
        return lambda q, k, kscale, v, vscale, bias, length, scaling, out, start, stop: kernel(
            q, k, kscale, v, vscale, bias, length, scaling, out, start, stop)

    @compiled
    def quantize(rows, form):
        # one row in a product's int8 form (sli.kernels.bound.Activations.quantize, its buffers)
        width, sumblock, order, padded, xq, xs, corr, bsum, oidx, oval, ordered = form
        if rows.shape[1] != width:
            padded[0, :rows.shape[1]] = rows[0]
            quantize_rows(padded, width, sumblock, xq, xs, corr, bsum, oidx, oval)
        else:
            quantize_rows(rows, width, sumblock, xq, xs, corr, bsum, oidx, oval)
        for i in range(order.shape[0]):
            ordered[i] = xq[order[i]]

    @compiled
    def product(team, p, rows):
        # one product of `rows`: led on the team from its threshold on, else on this thread (a job of
        # one chunk on a control block no worker reads); then its bias and INT8's outlier columns
        control, job, numbers, codes, chunks, own_control, own_job, own_numbers, team_work = team
        kind, count, work, bias, columns, outliers, args = p
        if chunks > 1 and work >= team_work:
            lead(control, job, numbers, codes, kind, count, min(count, chunks), *args)
        else:
            lead(own_control, own_job, own_numbers, codes, kind, count, 1, *args)
        y = args[-1]
        for j in range(bias.shape[0]):
            y[0, j] += bias[j]
        if columns.shape[0]:
            add_columns(rows, columns, outliers, y)

    @compiled
    def step(x, normed, norms, team, forms, products, attn, stage):
        # x: the residual row fp32 [1, H], updated in place (the layer's output); see the module docstring
        first_norm, first_eps, second_norm, second_eps = norms
        form_in, form_o, form_mid, form_down = forms
        q, k, v, o, gate, up, down = products
        heads, kv_heads, cos, sin, keys, key_scale, values, value_scale, position, bias, scaling, attended = attn
        yq, yk, yv = q[6][-1], k[6][-1], v[6][-1]
        if stage != 2:
            rms_norm(x, first_norm, first_eps, normed)
            quantize(normed, form_in)
            product(team, q, normed)
            product(team, k, normed)
            product(team, v, normed)
            rotate(yq, heads, cos, sin)
            rotate(yk, kv_heads, cos, sin)
            _store(yk[0], kv_heads, keys, key_scale, position)
            _store(yv[0], kv_heads, values, value_scale, position)
            if stage == 1:
                return
            _attend(yq.reshape(heads, yq.shape[1] // heads), keys, key_scale, values, value_scale, bias, position + 1,
                    scaling, attended, 0, kv_heads)
        attended_row = attended.reshape(1, attended.size)
        quantize(attended_row, form_o)
        product(team, o, attended_row)
        yo, ygate, yup, ydown = o[6][-1], gate[6][-1], up[6][-1], down[6][-1]
        add_rms_norm(x, yo, second_norm, second_eps, normed)
        quantize(normed, form_mid)
        product(team, gate, normed)
        product(team, up, normed)
        silu_mul(ygate, yup, ygate)
        quantize(ygate, form_down)
        product(team, down, ygate)
        add(x, ydown)

    for function, name in ((quantize, "quantize"), (product, "product")):
        stable_id(function, f"layer_step.{name}:{level}{variant}")
    return step


def private_control(slots: int, control_words: int) -> tuple:
    """A control block and job no worker reads: ``lead`` on it runs a job of one chunk on the
    calling thread."""
    job = np.zeros(slots, np.int64)
    return np.zeros(control_words, np.int64), job, job.view(np.float64)
