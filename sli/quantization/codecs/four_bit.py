"""NF4 and FP4: bitsandbytes' 4-bit bytes in transformers' checkpoint layout."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from typing import Any, ClassVar, Dict, Optional

import torch
from torch import Tensor

from ... import kernels
from ..config import QuantizationConfig, QuantizationMode, dtype_name
from ..formats import QuantizedTensor
from .base import Allocate, Codec, check_float, compute_into, write_into
from .four_bit_quantizer import (dequantize_blockwise_torch, dynamic_map, four_bit_code, nearest_codes,
                                 quantize_4bit_torch, quantize_blockwise_torch)

# bitsandbytes is optional: every codec has a pure-torch path with the same bytes. It is
# found here, not imported: importing it costs ~100 MB of RSS, which a process streaming
# under a memory budget should not pay unless a codec actually calls it.
BITSANDBYTES_AVAILABLE = importlib.util.find_spec("bitsandbytes") is not None


def _bitsandbytes_functional():
    """``bitsandbytes.functional``, imported quietly. Importing bitsandbytes on a CPU with
    AVX-512 BF16 tries to fetch an optional matmul kernel from a model hub and logs a warning
    when it cannot (offline, always here); sli never calls that kernel, so the line is noise."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    return bnbf

class _FourBitCodec(Codec):
    """NF4 / FP4 in bitsandbytes' bytes and transformers' checkpoint layout.

    Packed codes and absmax are byte-identical to ``bitsandbytes.functional.quantize_4bit``
    on either path. With double quant, bitsandbytes' native ``quantize_blockwise`` gives the
    nested absmax codes; the pure-torch path (no bitsandbytes) uses bitsandbytes' own torch
    reference, which picks the neighbouring code of the 256-value dynamic map on ~0.2% of
    the absmax values (never further than one code).
    """

    quant_type: ClassVar[str]
    writes_bfloat16 = True  # on CPU kernels: dequantize(q, torch.bfloat16, out=bfloat16) in one pass
    byte_fields = ("block_size", "double_quant")
    upgrade = QuantizationMode.INT8
    methods = ("rtn", "gptq")
    preset = {"double_quant": True, "compress_statistics": True}
    # a 4096x11008 weight on the AMX Xeon: fused 3.4 / 6.8 / 13.8 ms at 8 / 16 / 32 rows (one
    # vpdpwssd a product, sli.kernels.simd_ir.Emit.instruction) against 14-20 ms dequantizing to
    # bfloat16 for the matrix units, the two about even at 48 rows; whole 7B prompts gain up to 48
    # tokens and not at 56-64; AVX2 with float32 prompts: 15.3 / 23.2 against 30.9 / 36.3 at 32 /
    # 48 (docs/benchmarks.md)
    fused_max_rows = 48

    def quantize(self, weight: Tensor, config: QuantizationConfig, bitsandbytes: Optional[bool] = None
                 ) -> QuantizedTensor:
        """``weight`` in bitsandbytes' bytes; ``bitsandbytes``: as :meth:`encode_absmax`."""
        check_float(weight)
        w = weight.detach().contiguous()
        packed, absmax = quantize_4bit_torch(w, int(config.block_size), self.quant_type)
        stored, state = self.encode_absmax(absmax, config, w.device, bitsandbytes)
        return self._assemble(w, packed, stored, state, config)

    def quantize_sample(self, weight: Tensor, config: QuantizationConfig) -> QuantizedTensor:
        """As :meth:`quantize`, the block maxima's 8-bit codes from the pure-torch path: importing
        bitsandbytes takes 2-7 s (torch.compile's modules), which a process reading a warm cache
        need not pay to ready its kernels."""
        return self.quantize(weight, config, bitsandbytes=False)

    def encode_absmax(self, absmax: Tensor, config: QuantizationConfig, device: torch.device,
                      bitsandbytes: Optional[bool] = None) -> "tuple[Dict[str, Tensor], Dict[str, Any]]":
        """The stored form of the block maxima (8-bit codes + nested absmax with double quant) and
        what the quant state records about them; ``bitsandbytes``: its native codes (default: where
        it is installed; else bitsandbytes' torch reference's, see the class)."""
        qt = self.quant_type
        state: Dict[str, Any] = {}
        tensors: Dict[str, Tensor] = {}
        if config.double_quant:
            offset = absmax.mean()
            native = BITSANDBYTES_AVAILABLE if bitsandbytes is None else bitsandbytes
            if native and device.type == "cpu":
                bnbf = _bitsandbytes_functional()

                qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
                nested_absmax, nested_code = state2.absmax, state2.code
            else:
                nested_code = dynamic_map().to(device)
                qabsmax, nested_absmax = quantize_blockwise_torch(absmax - offset, nested_code, 256)
            tensors["weight.absmax"] = qabsmax
            tensors["weight.quant_map"] = four_bit_code(qt).to(device)
            tensors["weight.nested_absmax"] = nested_absmax.float()
            tensors["weight.nested_quant_map"] = nested_code.float().clone()
            state.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset.item()))
        else:
            tensors["weight.absmax"] = absmax
            tensors["weight.quant_map"] = four_bit_code(qt).to(device)
        return tensors, state

    @staticmethod
    def decoded_absmax(stored: Dict[str, Tensor], state: Dict[str, Any]) -> Tensor:
        """The block maxima as dequantization reads them (double quant decoded), float32."""
        if "weight.nested_absmax" not in stored:
            return stored["weight.absmax"].float()
        nested = dequantize_blockwise_torch(stored["weight.absmax"], stored["weight.nested_absmax"],
                                            stored["weight.nested_quant_map"], int(state["nested_blocksize"]))
        return nested + float(state["nested_offset"])

    def quantize_with(self, weight: Tensor, config: QuantizationConfig, absmax: Tensor,
                      source_dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
        """``weight`` coded against the given block maxima (fp32, one per block of the flattened
        weight): how a calibrated method (GPTQ) writes its result. The maxima are stored as
        :meth:`quantize` stores them (double-quantized when configured) and each value gets the
        code nearest to it times the maximum as stored, so a weight already on that grid
        (:meth:`decoded_absmax` times a code) gives back its own codes. ``source_dtype``: the dtype
        the entry records as the original weight's (default ``weight``'s)."""
        check_float(weight)
        w = weight.detach().contiguous()
        bs = int(config.block_size)
        if w.numel() % bs:
            raise ValueError(f"quantize_with needs whole blocks: {w.numel()} values, block size {bs}")
        stored, state = self.encode_absmax(absmax.float(), config, w.device)
        scale = self.decoded_absmax(stored, state).clamp(min=1e-38)
        scaled = torch.clamp(w.reshape(-1, bs).float() / scale.unsqueeze(1), -1, 1)
        codes = nearest_codes(scaled, self.quant_type).view(-1, 2)
        packed = ((codes[:, 0] << 4) | codes[:, 1]).unsqueeze(1)
        like = w if source_dtype is None else torch.empty(w.shape, dtype=source_dtype, device="meta")
        return self._assemble(like, packed, stored, state, config)

    def _assemble(self, w: Tensor, packed: Tensor, stored: Dict[str, Tensor], nested_state: Dict[str, Any],
                  config: QuantizationConfig) -> QuantizedTensor:
        qt = self.quant_type
        bs = int(config.block_size)
        state: Dict[str, Any] = {"quant_type": qt, "blocksize": bs, "dtype": dtype_name(w.dtype), "shape": list(w.shape)}
        state.update(nested_state)
        tensors: Dict[str, Tensor] = {"weight": packed, **stored}
        blob = json.dumps(state).encode("utf-8")
        tensors[f"weight.quant_state.bitsandbytes__{qt}"] = torch.tensor(list(blob), dtype=torch.uint8)
        meta = self._meta(w, self.mode, blocksize=bs, double_quant=bool(config.double_quant))
        if config.double_quant:
            meta["nested_offset"] = state["nested_offset"]
        return QuantizedTensor(tensors, meta)

    @staticmethod
    def _state(q: QuantizedTensor, qt: str) -> Dict[str, Any]:
        blob = q.tensors.get(f"weight.quant_state.bitsandbytes__{qt}")
        if blob is not None:
            return json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
        return {"blocksize": q.metadata["blocksize"], "nested_offset": q.metadata.get("nested_offset")}

    def prepare(self, q: QuantizedTensor, allocate: Optional[Allocate] = None) -> QuantizedTensor:
        # Double-quantized block maxima are decoded here, once, to float32 (4 bytes a block of
        # 64: +12.5% of the weight's bytes in memory, none on disk). Looking each up in the
        # product's inner loop instead cost NF4 1.4-1.8x its time (docs/benchmarks.md).
        if "_code" in q.tensors:
            return q
        t = q.tensors
        extra = {"_code": t["weight.quant_map"].float().contiguous()}
        if "weight.nested_absmax" in t:
            st = self._state(q, self.quant_type)
            nested = (t["weight.absmax"], t["weight.nested_absmax"].float(), t["weight.nested_quant_map"].float(),
                      int(st.get("nested_blocksize", 256)))
            offset = float(st["nested_offset"])
            if t["weight.absmax"].device.type == "cpu" and kernels.kernels_enabled():
                out = allocate(t["weight.absmax"].numel()) if allocate is not None else None
                extra["_absmax"] = kernels.dequantize_blockwise8(*nested, offset=offset, out=out)
            else:
                extra["_absmax"] = dequantize_blockwise_torch(*nested) + offset
        else:
            extra["_absmax"] = t["weight.absmax"].float().contiguous()
        return self._prepared(q, **extra)

    def _absmax(self, q: QuantizedTensor) -> Tensor:
        """Every block's maximum as float32 (the double-quantized ones decoded)."""
        return self.prepare(q).tensors["_absmax"]

    def row_slice(self, q: QuantizedTensor, start: int, stop: int) -> Optional[QuantizedTensor]:
        in_features = int(q.metadata["shape"][1])
        bs = int(q.metadata["blocksize"])
        if in_features % bs:
            return None  # blocks straddle rows
        t = q.tensors
        first, last = start * in_features // bs, stop * in_features // bs  # the rows' blocks
        packed = t["weight"]
        sliced = {"weight": packed.reshape(-1)[first * bs // 2:last * bs // 2].view(-1, *packed.shape[1:])}
        for name in ("weight.absmax", "_absmax"):  # one per block (8-bit codes when double-quantized)
            if name in t:
                sliced[name] = t[name].reshape(-1)[first:last]
        if "weight.nested_absmax" in t:
            nested_blocksize = int(self._state(q, self.quant_type).get("nested_blocksize", 256))
            if first % nested_blocksize:
                return None  # the slice would start inside a group of block maxima
            sliced["weight.nested_absmax"] = t["weight.nested_absmax"][first // nested_blocksize:
                                                                       -(-last // nested_blocksize)]
        return self._rows(q, start, stop, **sliced)

    def fused_linear(self, q: QuantizedTensor, x: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        out_features, in_features = q.metadata["shape"]
        bs = int(q.metadata["blocksize"])
        if in_features % bs:
            return None  # blocks straddle rows: dequantize instead
        t = q.tensors
        return kernels.matmul_4bit(x, t["weight"], t["_absmax"], t["_code"], bs, out_features, bias)

    def row_product(self, q: QuantizedTensor, bias: Optional[Tensor]):
        from ...kernels import bound

        out_features, in_features = (int(d) for d in q.metadata["shape"])
        t, bs = q.tensors, int(q.metadata["blocksize"])
        return bound.four_bit(t["weight"], t["_code"], bs, out_features, in_features, bias, t["_absmax"])

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
        qt = self.quant_type
        t = q.tensors
        st = self._state(q, qt)
        bs = int(st["blocksize"])
        shape = tuple(q.metadata["shape"])
        packed = t["weight"]
        nested = "weight.nested_absmax" in t
        device = packed.device
        if device.type == "cpu" and kernels.kernels_enabled():
            # the numba kernel writes bitsandbytes' values ~5x faster than its CPU kernel, and
            # bfloat16 ones (a prompt's weight chunks) without a float32 pass
            prepared = self.prepare(q)
            absmax, code = self._absmax(prepared), prepared.tensors["_code"]
            if dtype == torch.bfloat16 and out is not None and out.dtype == dtype and out.is_contiguous() \
                    and out.numel() == math.prod(shape):
                return kernels.dequantize_4bit(packed, absmax, code, bs, out)
            return compute_into(lambda buf: kernels.dequantize_4bit(packed, absmax, code, bs, buf),
                                  shape, dtype, device, out)
        if BITSANDBYTES_AVAILABLE and device.type == "cpu":
            # bitsandbytes' native CPU kernel (it has no out= on CPU, hence the copy)
            bnbf = _bitsandbytes_functional()

            state2 = None
            offset = None
            if nested:
                state2 = bnbf.QuantState(absmax=t["weight.nested_absmax"], code=t["weight.nested_quant_map"],
                                         blocksize=int(st.get("nested_blocksize", 256)), dtype=torch.float32)
                offset = torch.tensor(float(st["nested_offset"]))
            qs = bnbf.QuantState(absmax=t["weight.absmax"], shape=torch.Size(shape), dtype=dtype, blocksize=bs,
                                 code=t["weight.quant_map"], quant_type=qt, offset=offset, state2=state2)
            return write_into(bnbf.dequantize_4bit(packed, qs), out)
        absmax = self._absmax(q)
        return compute_into(lambda buf: self._dequantize_torch(t, absmax, bs, buf), shape, dtype, device, out)

    @staticmethod
    def _dequantize_torch(t: Dict[str, Tensor], absmax: Tensor, bs: int, res: Tensor) -> Tensor:
        """Pure torch: one 256-entry byte -> (hi, lo) value gather, one multiply into ``res`` (fp32)."""
        device = res.device
        n = res.numel()
        code = t["weight.quant_map"].float().to(device)
        pair = torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)  # [256, 2]: byte -> (hi, lo)
        vals = pair.index_select(0, t["weight"].reshape(-1).long()).view(-1)
        flat = res.view(-1)
        rem = n % bs
        full = n - rem
        if full:
            torch.mul(vals[:full].view(-1, bs), absmax[: full // bs].view(-1, 1), out=flat[:full].view(-1, bs))
        if rem:
            torch.mul(vals[full:n], absmax[-1], out=flat[full:])
        return res


class NF4Codec(_FourBitCodec):
    mode = QuantizationMode.NF4
    quant_type = "nf4"


class FP4Codec(_FourBitCodec):
    mode = QuantizationMode.FP4
    quant_type = "fp4"

