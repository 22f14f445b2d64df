"""One sequence's decode token over a model whose layers are all resident, without the
model's forward.

With every layer one compiled call (:class:`sli.decode_step.OneCallStep`), what is left of a
small model's decode token is Python: transformers' forward makes the causal mask and calls
each decoder layer through ``nn.Module``, sli's runner fetches and times it, the step checks
its arguments. perf put ~40% of SmolLM2-135M's main thread there (docs/benchmarks.md). Here a
token of one sequence (one new position, no padding) runs what the forward runs: the model's
own modules where it calls modules (the embedding, the rotary embedding, the final norm, the
head) and the layers' compiled calls one after another on one residual row, the kernel team
led for all of them. The logits equal the forward's, bit for bit (tests/test_resident_decode.py).

Anything else takes the forward: a batch, a prompt, padding, a streamed layer, a layer without
a one-call step, a KV layer that cannot take the position in place, another base model than
:data:`BASE_MODELS`. ``SLI_NO_RESIDENT_DECODE=1`` turns it off. A token that goes this way
records no per-layer timing in the runner (the layers are resident: there is no loading to time).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import nn

from . import decode_step, kernels, settings
from . import transformers_adapter as hf
from .kernels import dispatch
from .layer_runner import LayerRunner

# Base models whose forward is embed -> rotary -> the layers -> norm (the decoder layers are
# Llama's: sli.decode_step.LLAMA_LAYERS)
BASE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model")


def enabled() -> bool:
    return decode_step.one_call_enabled() and not settings.flag("SLI_NO_RESIDENT_DECODE")


class ResidentDecode:
    """The token path of one processor's model (see the module docstring)."""

    def __init__(self, parts: hf.DecoderParts, runner: LayerRunner, device: torch.device) -> None:
        self.parts = parts
        self.runner = runner
        self.device = device
        self._calls: Optional[List[decode_step.OneCallStep]] = None
        self._steps_seen: tuple = ()  # the runner's steps the calls were taken from

    @classmethod
    def build(cls, model: nn.Module, runner: LayerRunner, device: torch.device) -> Optional["ResidentDecode"]:
        parts = hf.decoder_parts(model)
        if device.type != "cpu" or parts is None or type(parts.base).__name__ not in BASE_MODELS:
            return None
        return cls(parts, runner, device)

    def run(self, ids: torch.Tensor, mask: Optional[torch.Tensor], positions: torch.Tensor, kv_cache
            ) -> Optional[torch.Tensor]:
        """The last position's logits ``[1, V]`` for one new token ``ids`` ``[1, 1]`` at
        ``positions``, its key and value written into ``kv_cache``; None (nothing done) where
        this path does not apply."""
        if not enabled() or ids.shape != (1, 1) or (mask is not None and not bool(mask.all())):
            return None
        calls = self._one_calls()
        layers = getattr(kv_cache, "layers", None)
        if calls is None or layers is None or len(layers) != len(calls):
            return None
        team = dispatch.team()
        if not all(call.runs_with(team) for call in calls) or not all(
                getattr(layer, "packed_reads", False) and layer.can_append_one() for layer in layers):
            return None
        parts = self.parts
        with torch.inference_mode(), kernels.fused_pass(1, self.device):
            hidden = parts.embed(ids)
            rotary = decode_step.rotary_arrays(parts.rotary(hidden, positions), 1)
            x = hidden.detach().numpy().reshape(1, -1).copy()  # the residual row, through every layer in place
            with team.leading() if team is not None else contextlib.nullcontext(False) as leads:
                for call, layer in zip(calls, layers):
                    slot = layer.reserve_one()
                    call.call(x, slot, decode_step.attention_bias(None, slot[4] + 1, call), rotary,
                              call.control(team if leads else None))
            hidden = parts.norm(torch.from_numpy(x).view(hidden.shape))
            logits = parts.head(hidden)
        self.runner.streamer.step += 1  # a pass over the layers, as the runner counts them
        return logits[:, -1, :]

    def _one_calls(self) -> Optional[List[decode_step.OneCallStep]]:
        """Each layer's one-call step where every layer is resident and has one, else None
        (looked up again when the runner's steps change)."""
        runner = self.runner
        count = len(runner.layers)
        if len(runner.resident) != count:
            return None
        steps = tuple(runner.decode_step(i) for i in range(count))
        if steps != self._steps_seen:
            self._steps_seen = steps
            calls = [None if step is None else step.one_call() for step in steps]
            self._calls = None if any(call is None for call in calls) else calls
        return self._calls
