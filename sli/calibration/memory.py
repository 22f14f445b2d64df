"""What a calibration holds in memory, and how many tokens a chunk can take within a budget.

One layer's calibration goes through three phases, one after another:

1. the float pass: the layer's checkpoint tensors (and their copy in the pass dtype, when it
   differs), every linear's Hessian, one chunk of activations running through the layer; with
   ``gptq_asymmetric`` also every linear's input drift (as large as its Hessian), the float
   model's chunk and its output, and its linears' inputs held for the pass on the model's;
2. the solve: the checkpoint tensors, the Hessians not yet solved, the factor of the one being
   solved (two ``[in, in]`` float32 buffers, :mod:`sli.quantization.gptq`) and one weight's
   float32 copies (the weight, a slab of it transposed, the codec's temporaries; with
   ``gptq_asymmetric`` the drifts not solved yet and the corrections of the weights that share
   the input);
3. the quantized pass: the layer dequantized in the pass dtype, one chunk of activations.

Besides, the processor's shared modules and the kernels' runtime stay loaded. The chunk is
the only part that can shrink, down to one calibration window; the activations between layers
wait on disk (:mod:`.activations`), one chunk in memory at a time.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import kernels
from .. import transformers_adapter as hf
from ..errors import SLIError
from ..memory_sizing import attention_heads, element_bytes, intermediate_size
from ..quantization.gptq import HESSIAN_BLOCK, SOLVE_VALUES, int8_hessians
from ..settings import GB


@dataclasses.dataclass(frozen=True)
class CalibrationMemory:
    """The bytes one layer's calibration holds, by part (the widest layer's)."""

    shared: int  # the processor's shared modules (the embedding rows the text reads) and the kernels' runtime
    layer: int  # the layer's checkpoint tensors, and their copy in the pass dtype when it differs
    hessians: int  # every linear's Hessian and input drift (an upper bound: linears reading one input share them)
    solve: int  # the solve's most at once: the Hessians left, one factor, one weight's copies
    per_token: int  # one token's activations through the layer (hidden states, MLP, attention, x^T x's input)

    def peak(self, chunk_tokens: int) -> int:
        """The most the calibration holds at once with chunks of ``chunk_tokens``."""
        return self.shared + self.layer + max(self.hessians + chunk_tokens * self.per_token, self.solve)

    def chunk_tokens(self, budget: Optional[int], window: int, most: int, model_id: str) -> int:
        """The most tokens (whole windows, ``most`` at most) a chunk takes within ``budget``
        (bytes; None: ``most``); a budget that cannot hold one window is an error naming the
        budget that would."""
        most = max(window, most // window * window)
        if budget is None:
            return most
        if self.peak(window) > budget:
            need = self.peak(window)
            raise SLIError(f"calibrating {model_id} needs a memory budget of at least {need / GB:.2f} GiB, "
                           f"{budget / GB:.2f} given (shared modules {self.shared / GB:.2f}, one layer "
                           f"{self.layer / GB:.2f}, its Hessians {self.hessians / GB:.2f}, the solve "
                           f"{self.solve / GB:.2f}, one window of activations {window * self.per_token / GB:.2f}); "
                           f"raise --memory-budget-gb to {need / GB:.2f}")
        fits = (budget - self.shared - self.layer - self.hessians) // max(1, self.per_token) // window * window
        return int(min(most, fits))


def calibration_memory(processor, index: int, pass_dtype: torch.dtype, window: int, tokens: int) -> CalibrationMemory:
    """:class:`CalibrationMemory` of decoder layer ``index`` of ``processor``, run in ``pass_dtype``
    on ``tokens`` tokens in windows of ``window`` (read from its skeleton: nothing is loaded)."""
    configs = [c for c in processor.quantizer.configs() if c.calibrated]
    asymmetric = any(float(c.gptq_asymmetric) > 0 for c in configs)
    sequential = any(c.gptq_sequential for c in configs)
    layer = processor._loader_layers[index]
    stored = element_bytes(processor.checkpoint.storage_dtype())
    passed = element_bytes(pass_dtype)
    values = sum(p.numel() for p in layer.parameters())
    layer_bytes = values * stored + (values * passed if passed != stored else 0)
    shapes = []  # (in, out) of each linear, in the order they are solved
    parents = []
    for path, conv1d in processor._linears[index].items():
        weight = layer.get_submodule(path).weight
        shapes.append((weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0]))
        parents.append(path.rpartition(".")[0])
    # the outputs of the linears that may share each one's input (one parent module, one input
    # width: q/k/v with o, gate with up): a group's corrections are held together
    shared_out = [sum(o for (i2, o), p2 in zip(shapes, parents) if i2 == i and p2 == p)
                  for (i, _), p in zip(shapes, parents)]
    hessians = [i * i * 4 * (2 if asymmetric else 1) for i, _ in shapes]  # with the drifts
    widest = max((i for i, _ in shapes), default=0)
    int8 = int8_hessians(processor.device)  # x^T x from int8 activations: their two copies, a block of the product
    solve = max((sum(hessians[n + 1:])  # the Hessians (and drifts) not solved yet
                 + 2 * i * i * 4  # this one (or its drift) and its factor's buffer
                 + 2 * i * o * 4 + 4 * min(i * o, SOLVE_VALUES)  # the float32 weight, the codec's copy, a slab
                 + (4 * i * g if asymmetric else 0)  # the group's corrections toward the float model
                 for n, ((i, o), g) in enumerate(zip(shapes, shared_out))), default=0)
    if asymmetric and sequential:  # the float weights beside the rounded ones
        layer_bytes += values * passed
    hidden = hf.text_config(processor.config).hidden_size
    heads, kv_heads, head_dim = attention_heads(processor.config)
    per_token = (passed * (4 * hidden + 2 * (heads + 2 * kv_heads) * head_dim + 3 * intermediate_size(processor.config))
                 + 4 * heads * window  # one row of attention scores per head, float32
                 + (4 + 2 * int8) * widest)  # the Hessian's input in float32 (and in int8, twice)
    if asymmetric:  # the float model's chunk and output, its linears' inputs held, the drift's temporaries
        per_token += passed * (2 * hidden + sum(i for i, _ in shapes)) + (8 + 2 * passed) * widest
    shared = processor._resident_shared_bytes(tokens)  # the embedding rows the text can read
    runtime = kernels.RUNTIME_BYTES if kernels.kernels_enabled() else 0
    gram_block = 4 * HESSIAN_BLOCK * widest if int8 else 0
    return CalibrationMemory(shared=shared + runtime, layer=layer_bytes, hessians=sum(hessians) + gram_block,
                             solve=solve, per_token=per_token)

