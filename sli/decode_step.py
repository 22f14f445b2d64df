"""A decoder layer's one-token step in a few kernel calls, for the families whose layers are
Llama's: pre-norm RMSNorm, rotary attention, a SiLU-gated MLP (Llama, Mistral, Qwen2).

Run through ``transformers``' modules, one token of one layer is ~40 torch operations and 7
module calls, each a few to tens of microseconds of Python and dispatch: on SmolLM2-135M
(30 layers of products that take ~60 µs each) that was ~3/4 of a decode step
(docs/benchmarks.md). :class:`DecodeStep` runs the same layer as ~15 calls: its norms,
rotary embedding, SiLU and residual adds as numba kernels (:mod:`sli.kernels.decode_ops`), its
products as :class:`~sli.kernels.bound.RowProduct` s (the layer's kernels, their arrays looked
up once, q/k/v and gate/up sharing one quantized input). One sequence's keys and values go
straight into its compact KV buffers (:meth:`CompactKVLayer.append_one`, the bytes ``update``
writes) and its attention reads them in place (:func:`sli.attention.decode_one`); a batch's go
through the cache's own ``update`` and :mod:`sli.attention`, exactly as the module calls them. Prompts, GPUs, other families and anything the step does not cover run
``transformers``' forward. ``SLI_NO_DECODE_STEP=1`` turns the step off.

The architecture stays ``transformers``': the step applies to the classes in
:data:`LLAMA_LAYERS` only, and tests/test_decode_step.py checks their forwards are still
Llama's and that the step's output equals the module's (to float32 rounding: the norms sum
in another order; the products are the same kernels, bit for bit).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import attention, kernels, settings
from .kernels import bound, dispatch
from .quantization import QuantizedLinear

# Decoder-layer classes whose forward is Llama's (pinned by tests/test_decode_step.py). Their
# attention differs only in passing a sliding window (Mistral, Qwen2): a layer with one set
# keeps transformers' forward.
LLAMA_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_SILU = ("SiLUActivation", "SiLU")
_PRODUCTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")


def enabled() -> bool:
    return kernels.kernels_enabled() and not settings.flag("SLI_NO_DECODE_STEP")


def warm_up() -> None:
    """Compile, or load from numba's on-disk cache, the step's small kernels (with the types
    of its calls), so the first token does not pay for it."""
    if not enabled():
        return
    ops = kernels.layer_ops()
    rows, cos = np.zeros((1, 64), np.float32), np.zeros((1, 16), np.float32)
    weight, out = np.ones(64, np.float32), np.empty((1, 64), np.float32)
    ops["rms_norm"](rows, weight, 1e-5, out)
    ops["add_rms_norm"](rows, out, weight, 1e-5, out)
    ops["add"](rows, out)
    ops["rotate"](out, 4, cos, cos)
    ops["silu_mul"](out, rows, out)
    ops["store_bf16"](rows[0], 4, np.zeros((4, 2, 16), np.uint16), 0)
    ops["store_int8"](rows[0], 4, np.zeros((4, 2, 16), np.int8), np.zeros((4, 2), np.float32), 0)


class DecodeStep:
    """One loaded layer's step; :meth:`run` returns None where it does not apply."""

    def __init__(self, layer: nn.Module, products: Dict[str, bound.RowProduct], resident: bool = True) -> None:
        attn = layer.self_attn
        self.attn = attn
        self.layer_idx = attn.layer_idx
        self.scaling = attn.scaling
        self.head_dim = attn.head_dim
        forms: Dict[bound.Activations, bound.Activations] = {}
        for product in products.values():  # equal forms as one object: shared by identity
            product.activations = forms.setdefault(product.activations, product.activations)
        self.q, self.k, self.v, self.o, self.gate, self.up, self.down = (products[p] for p in _PRODUCTS)
        self._scratch: Dict[int, _Scratch] = {}  # by row count: the arrays a call writes, reused
        self.heads = self.q.out_features // self.head_dim
        self.kv_heads = self.k.out_features // self.head_dim
        self.norm1 = _norm(layer.input_layernorm)
        self.norm2 = _norm(layer.post_attention_layernorm)
        self._one_call: Optional[OneCallStep] = None  # the one-row step as one compiled call, made on first use
        # a resident layer's one-row step is one compiled call; a streamed layer is bound for one
        # pass, where making that call's arguments cost more than it saves (make demo: 4.9-5.4
        # tokens/s with it against 7.2-8.1 without, 25 of 30 layers streamed)
        self._one_call_checked = not resident

    @classmethod
    def build(cls, layer: nn.Module, resident: bool = True) -> Optional["DecodeStep"]:
        """The step of ``layer`` (its weights loaded), or None for a layer it does not cover;
        ``resident``: the layer stays loaded (its one-row step then runs as one compiled call)."""
        if not enabled() or type(layer).__name__ not in LLAMA_LAYERS:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        if (type(mlp.act_fn).__name__ not in _SILU or _sliding_window(layer) is not None
                or getattr(attn.config, "_attn_implementation", None) != attention.NAME):
            return None
        products = {}
        for path in _PRODUCTS:
            module = layer.get_submodule(path)
            if not isinstance(module, QuantizedLinear) or not module.loaded or module.compute_dtype != torch.float32:
                return None
            codec = module.codec
            product = codec.row_product(codec.prepare(module.qweight), module.bias)
            if product is None:
                return None
            products[path] = product
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.device.type != "cpu" or not hasattr(norm, "variance_epsilon"):
                return None
        return cls(layer, products, resident)

    def run(self, args: tuple, kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """The layer's output for the call ``layer(*args, **kwargs)``, or None where the step
        does not apply (more than one position, no KV cache, rows the kernels do not take)."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        if (hidden is None or len(args) > 1 or hidden.dim() != 3 or hidden.shape[1] != 1
                or hidden.dtype != torch.float32 or hidden.device.type != "cpu"
                or not 0 < hidden.shape[0] <= kernels.FUSED_MAX_TOKENS or not bound.takes(hidden.shape[0])):
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rotary = kwargs.get("position_embeddings")
        if cache is None or rotary is None or kwargs.get("output_attentions"):
            return None
        rest = {k: v for k, v in kwargs.items()
                if k not in ("hidden_states", "attention_mask", "cache", "past_key_values", "position_embeddings")}
        return self._step(hidden, kwargs.get("attention_mask"), cache, rotary, rest)

    def _step(self, hidden: torch.Tensor, mask, cache, rotary: Tuple[torch.Tensor, torch.Tensor],
              rest: Dict[str, Any]) -> torch.Tensor:
        rows = hidden.shape[0]
        if rows == 1 and one_call_enabled():
            own = _one_row_layer(cache, self.layer_idx, rows, rest)
            one_call = self.one_call() if own is not None else None
            if one_call is not None:
                out = one_call.run(hidden, own, mask, rotary_arrays(rotary, rows))
                if out is not None:
                    return out
        ops = kernels.layer_ops()
        scratch = self._scratch.get(rows) or self._scratch.setdefault(rows, _Scratch(self, rows))
        # numpy's reshapes and views cost ~0.3 µs, torch's ~3-6 (a token crosses ~30 layers)
        x = hidden.detach().numpy().reshape(rows, -1).copy()  # the residual stream, updated in place: the output
        normed = scratch.normed
        ops["rms_norm"](x, self.norm1[0], self.norm1[1], normed)
        q, k, v = self._products(normed, scratch, self.q, self.k, self.v)
        cos, sin = rotary_arrays(rotary, rows)
        ops["rotate"](q, self.heads, cos, sin)
        ops["rotate"](k, self.kv_heads, cos, sin)
        own = _one_row_layer(cache, self.layer_idx, rows, rest)
        if own is not None and own.append_one(k[0], v[0]):  # one sequence: straight into its buffers
            out = attention.decode_one(q[0], own, mask, self.scaling).reshape(1, -1)
        else:  # as the module: the cache's update, then the attention function
            keys, values = cache.update(_heads(k, rows, self.kv_heads, self.head_dim),
                                        _heads(v, rows, self.kv_heads, self.head_dim), self.layer_idx)
            out, _ = attention.attention_forward(self.attn, _heads(q, rows, self.heads, self.head_dim), keys, values,
                                                 mask, dropout=0.0, scaling=self.scaling, **rest)
            out = np.ascontiguousarray(out.reshape(rows, -1).numpy())
        (attended,) = self._products(out, scratch, self.o)
        ops["add_rms_norm"](x, attended, self.norm2[0], self.norm2[1], normed)
        gate, up = self._products(normed, scratch, self.gate, self.up)
        ops["silu_mul"](gate, up, gate)
        (down,) = self._products(gate, scratch, self.down)
        ops["add"](x, down)
        return torch.from_numpy(x.reshape(hidden.shape))

    def one_call(self) -> Optional["OneCallStep"]:
        """The one-row step as one compiled call, or None where the layer's products do not
        fit it (built on first use)."""
        if not self._one_call_checked:
            self._one_call_checked = True
            self._one_call = OneCallStep.build(self)
        return self._one_call

    @staticmethod
    def _products(rows: np.ndarray, scratch: "_Scratch", *products: bound.RowProduct):
        """Each product of float32 ``rows`` (into the scratch arrays), the input quantized once
        per form."""
        form = quantized = None
        outputs = []
        for product in products:
            if product.activations is not form:
                form = product.activations
                quantized = form.quantize(rows, scratch.quantize[form])
            y = scratch.outputs[product]
            product(rows, quantized, y)
            outputs.append(y)
        return outputs


class _Scratch:
    """The arrays a step of ``rows`` rows writes besides its output, kept for the next call
    (a layer runs one call at a time; each call's output is a fresh array)."""

    def __init__(self, step: DecodeStep, rows: int) -> None:
        products = (step.q, step.k, step.v, step.o, step.gate, step.up, step.down)
        self.normed = np.empty((rows, step.norm1[0].shape[0]), np.float32)
        self.outputs = {product: np.empty((rows, product.out_features), np.float32) for product in products}
        self.quantize = {p.activations: p.activations.buffers(rows) for p in products}


def one_call_enabled() -> bool:
    """Whether a one-row step runs as one compiled call (:class:`OneCallStep`);
    ``SLI_NO_ONE_CALL=1`` runs it op by op."""
    return not settings.flag("SLI_NO_ONE_CALL")


class OneCallStep:
    """A layer's one-row step as one compiled call (:mod:`sli.kernels.layer_step`): the
    step's arguments as the tuples that call takes, built once. Its output is the op-by-op
    step's, bit for bit (the same kernels on the same arrays)."""

    def __init__(self, step: DecodeStep, forms: tuple, products: tuple, max_work: int, level: str) -> None:
        from .kernels import layer_step, team as kernel_team

        table = dispatch.table()
        self.step = step
        variant = dispatch.variant()
        self.compiled = layer_step.build(table, kernel_team.build(table, level, variant)["lead"], level, variant)
        self.forms, self.products, self.max_work = forms, products, max_work
        self.norms = (step.norm1[0], step.norm1[1], step.norm2[0], step.norm2[1])
        self.codes = kernel_team.type_codes(level)
        self.own = layer_step.private_control(kernel_team.JOB_SLOTS, kernel_team.ASLEEP)
        self.attended = np.empty((step.heads, step.head_dim), np.float32)
        self.zeros = np.zeros(0, np.float32)  # attention's bias without a mask, grown as needed

    @classmethod
    def build(cls, step: DecodeStep) -> Optional["OneCallStep"]:
        """The call for ``step``'s layer, or None where its products do not fit it (a kernel or
        arguments the team does not take, forms not shared as Llama's)."""
        from .kernels import team as kernel_team

        level = dispatch.simd_path()
        q, k, v, o, gate, up, down = (step.q, step.k, step.v, step.o, step.gate, step.up, step.down)
        if not (q.activations is k.activations is v.activations and gate.activations is up.activations):
            return None
        scratch = step._scratch.get(1) or step._scratch.setdefault(1, _Scratch(step, 1))
        forms = tuple(_form(p.activations, scratch.quantize[p.activations]) for p in (q, o, gate, down))
        products = []
        for p in (q, k, v, o, gate, up, down):
            args = p.arguments(scratch.quantize[p.activations].quantized(), scratch.outputs[p])
            if not kernel_team.accepts(p.kernel, args, level):
                return None
            bias = _NO_BIAS if p.bias is None else p.bias.numpy()
            columns, outliers = (_NO_COLUMNS, _NO_OUTLIERS) if p.columns is None else (p.columns, p.outliers)
            products.append((kernel_team.KINDS.index(p.kernel), p.out_features, p.work_per_row, bias, columns,
                             outliers, args))
        return cls(step, forms, tuple(products), max(p.work_per_row for p in (q, k, v, o, gate, up, down)), level)

    def ready(self, kv_dtype: str) -> None:
        """Compile, or load from numba's cache, the call for this layer's arguments with
        ``kv_dtype`` keys and values, so the first token does not wait for it (~180 ms)."""
        from numba import typeof

        step = self.step
        shape = (step.kv_heads, 1, step.head_dim)
        if kv_dtype == "int8":
            stored, scale = np.zeros(shape, np.int8), np.zeros(shape[:2], np.float32)
        else:
            stored, scale = np.zeros(shape, np.uint16), np.zeros((0, 0), np.float32)
        rotary = np.zeros((1, step.head_dim), np.float32)
        attn = (step.heads, step.kv_heads, rotary, rotary, stored, scale, stored, scale, 0, np.zeros(1, np.float32),
                float(step.scaling), self.attended)
        x = np.zeros((1, self.norms[0].shape[0]), np.float32)
        args = (x, step._scratch[1].normed, self.norms, self.control(None), self.forms, self.products, attn, 0)
        self.compiled.compile(tuple(typeof(arg) for arg in args))

    def run(self, hidden: torch.Tensor, own, mask, rotary: Tuple[np.ndarray, np.ndarray]) -> Optional[torch.Tensor]:
        """The layer's output for one row ``hidden`` whose keys and values go to the compact
        layer ``own``; None (nothing done) where it does not apply: ``own`` takes
        :meth:`update`, or no team and a product that the pool would split."""
        team = dispatch.team()
        if not self.runs_with(team):
            return None
        slot = own.reserve_one()
        if slot is None:
            return None
        x = hidden.detach().numpy().reshape(1, -1).copy()  # the residual stream, updated in place: the output
        bias = attention_bias(mask, slot[4] + 1, self)
        with team.leading() if team is not None else contextlib.nullcontext(False) as leads:
            self.call(x, slot, bias, rotary, self.control(team if leads else None))
        return torch.from_numpy(x.reshape(hidden.shape))

    def runs_with(self, team) -> bool:
        """Whether this call runs as the op-by-op step would with ``team`` (None: no team): without
        one, the pool would split a product of :data:`~sli.kernels.dispatch.INLINE_WORK` on."""
        return team is not None or self.max_work < dispatch.INLINE_WORK

    def control(self, team) -> tuple:
        """The control block the call's products go through: ``team``'s (its leader: the
        caller), or, with None, one no worker reads (every product on this thread)."""
        if team is None:
            return (*self.own, self.codes, 1, *self.own, dispatch.TEAM_WORK)
        return (team.control, team.job, team.numbers, team.codes, team.chunks, *self.own, dispatch.TEAM_WORK)

    def call(self, x: np.ndarray, slot: tuple, bias: np.ndarray, rotary: Tuple[np.ndarray, np.ndarray],
             control: tuple) -> None:
        """The step on the residual row ``x`` (float32 ``[1, H]``, updated in place), its key and
        value written at ``slot`` (:meth:`CompactKVLayer.reserve_one`), attention's additive
        ``bias`` over the positions up to it."""
        keys, key_scale, values, value_scale, position = slot
        length = position + 1
        step = self.step
        attn = (step.heads, step.kv_heads, rotary[0], rotary[1], keys, key_scale, values, value_scale, position,
                bias, float(step.scaling), self.attended)
        normed = step._scratch[1].normed
        if not kernels.split_attention(keys, length):  # as decode_attention_arrays runs it
            self.compiled(x, normed, self.norms, control, self.forms, self.products, attn, 0)
            return
        # a long context: attention split across threads between the two halves
        self.compiled(x, normed, self.norms, control, self.forms, self.products, attn, 1)
        query = step._scratch[1].outputs[step.q].reshape(step.heads, step.head_dim)
        kernels.decode_attention_arrays(query, keys, key_scale, values, value_scale, bias, length, step.scaling,
                                        out=self.attended)
        self.compiled(x, normed, self.norms, control, self.forms, self.products, attn, 2)


_NO_BIAS, _NO_COLUMNS, _NO_OUTLIERS = np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)


def _form(form: bound.Activations, buffers: bound.QuantizeBuffers) -> tuple:
    """An activation form as :func:`sli.kernels.layer_step`'s ``quantize`` takes it."""
    xq, xs, corr, bsum, oidx, oval = buffers.arrays
    ordered = xq if buffers.ordered is None else buffers.ordered
    return (form.width, form.sumblock, form.order(), buffers.padded, xq, xs, corr, bsum, oidx, oval, ordered)


def attention_bias(mask, length: int, holder: "OneCallStep") -> np.ndarray:
    """The additive mask over ``length`` positions (:func:`sli.attention.decode_one`'s);
    without a mask, zeros ``holder`` keeps."""
    if mask is not None:
        return attention.row_bias(mask, length)
    if holder.zeros.shape[0] < length:
        holder.zeros = np.zeros(max(length, 2 * holder.zeros.shape[0], 256), np.float32)
    return holder.zeros[:length]


def _one_row_layer(cache, index: int, rows: int, rest: Dict[str, Any]):
    """The cache's layer ``index`` where a one-row step can write and read it in place: an
    sli compact layer with in-place reads (:mod:`sli.kv_cache`), and no attention option that
    :func:`sli.attention.attention_forward` would hand to SDPA."""
    layers = getattr(cache, "layers", None)
    if rows != 1 or layers is None or index >= len(layers) or any(rest.get(name) for name in attention.UNSUPPORTED):
        return None
    layer = layers[index]
    return layer if getattr(layer, "packed_reads", False) and hasattr(layer, "append_one") else None


def _norm(norm: nn.Module) -> Tuple[np.ndarray, float]:
    return norm.weight.detach().float().contiguous().numpy(), float(norm.variance_epsilon)


def _sliding_window(layer: nn.Module) -> Optional[int]:
    """The window the layer's attention passes (Qwen2: its own; Mistral: the config's)."""
    attn = layer.self_attn
    if type(layer).__name__ == "Qwen2DecoderLayer":
        return getattr(attn, "sliding_window", None)
    if type(layer).__name__ == "MistralDecoderLayer":
        return getattr(attn.config, "sliding_window", None)
    return None


_last_rotary: tuple = ()  # (cos, sin, rows, cos as numpy, sin as numpy): every layer of a token gets the same


def rotary_arrays(rotary: Tuple[torch.Tensor, torch.Tensor], rows: int) -> Tuple[np.ndarray, np.ndarray]:
    """The token's cos and sin as float32 numpy ``[B, D]``, converted once for all its layers
    (the entry holds the tensors, so their identity stands for their values)."""
    global _last_rotary
    last = _last_rotary
    if last and last[0] is rotary[0] and last[1] is rotary[1] and last[2] == rows:
        return last[3], last[4]
    cos, sin = _rows(rotary[0], rows), _rows(rotary[1], rows)
    _last_rotary = (rotary[0], rotary[1], rows, cos, sin)
    return cos, sin


def _rows(t: torch.Tensor, rows: int) -> np.ndarray:
    """cos or sin ``[B, 1, D]`` (or ``[1, 1, D]`` shared by the batch) as float32 ``[B, D]``."""
    t = t.reshape(t.shape[0], -1)
    if t.shape[0] != rows:
        t = t.expand(rows, -1)
    return t.to(torch.float32).contiguous().numpy()


def _heads(x: np.ndarray, rows: int, heads: int, dim: int) -> torch.Tensor:
    """``[B, heads * D]`` as the modules' ``[B, heads, 1, D]``."""
    return torch.from_numpy(x).view(rows, 1, heads, dim).transpose(1, 2)
