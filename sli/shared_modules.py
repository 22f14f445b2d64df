"""The modules outside the decoder stack (embeddings, final norm, head, rotary tables): loaded
once into the skeleton and kept resident."""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
from torch import nn

from .checkpoint import Checkpoint, SkeletonLoader
from .page_cache import in_file_mapping, unmap_read_pages
from .errors import ModelLoadError
from .quantization import QuantizationConfig, QuantizedLinear, QuantizedTensor, codec_for


def load_shared_modules(model: nn.Module, loader: SkeletonLoader, checkpoint: Checkpoint, layers_path: str,
                        device: torch.device, compute_dtype: torch.dtype, packed: bool, int8_head: bool = False) -> int:
    """Load every tensor outside ``layers_path`` into ``model``; returns their bytes.

    On CPU (``packed``) a bfloat16 checkpoint's embedding and head stay bfloat16 (see
    :func:`narrow_embeddings`), so they are loaded as stored, never widened first; with
    ``int8_head`` the head becomes int8 (:func:`quantize_head`).
    """
    state = checkpoint.get_many(loader.names_by_layer.get(None, []))
    narrow = (packed and compute_dtype == torch.float32
              and all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point()))
    if narrow:  # the skeleton's (meta) tables take the checkpoint's dtype; the loader keeps it
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.to(torch.bfloat16)
    loader.keys.load(model, state, compute_dtype, device=str(device))
    del state
    checkpoint.release()
    model.tie_weights()
    prefix = layers_path + "."
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix) and tensor.device.type == "meta":
            raise ModelLoadError(f"the checkpoint has no tensor for {name!r}; the model files are incomplete: re-save the model")
    int8_head = int8_head and packed and device.type == "cpu"
    if device.type == "cpu" and not int8_head:
        own_head(model)
    kept_head = narrow_embeddings(model, layers_path, compute_dtype) if narrow else None
    if int8_head:
        if quantize_head(model, compute_dtype):
            kept_head = None  # the state dict lists the int8 head's tensors
        else:
            own_head(model)
    if device.type == "cuda":  # non-persistent buffers (rotary tables) were made on CPU by the skeleton
        move_shared_tensors(model, prefix, device)
    shared = {t.data_ptr(): t.numel() * t.element_size() for n, t in model.state_dict().items()
              if not n.startswith(prefix) and t.device.type != "meta"}
    if kept_head is not None:
        shared[kept_head.data_ptr()] = kept_head.numel() * kept_head.element_size()
    return sum(shared.values())  # a tied head shares the embedding's storage


def move_shared_tensors(model: nn.Module, prefix: str, device: torch.device) -> None:
    """Move every parameter and buffer outside the decoder stack (names not under ``prefix``)
    to ``device``. ``model.to`` cannot: the stack's weights are still meta tensors, which have
    no data to copy; the streamer fills them on the device layer by layer. A tied head is the
    embedding's parameter object, moved once."""
    for name, module in model.named_modules():
        if (name + ".").startswith(prefix):
            continue
        for param in module._parameters.values():
            if param is not None and param.device.type != "meta" and param.device != device:
                param.data = param.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def mapped_embedding(model: nn.Module) -> "tuple[int, int]":
    """``(bytes, bytes a row)`` of the input embedding where its weight is a view of a file
    mapping (a bfloat16 checkpoint's untied embedding, loaded as stored: a view of its
    safetensors mapping), else ``(0, 0)``. Such a table costs memory only for the rows looked
    up, clean file pages the kernel can drop and read again (a row is a few KB a token), so the
    memory plan counts it by the rows a context can touch, not whole (Linux: ``/proc/self/maps``;
    elsewhere it counts whole)."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or weight.dim() != 2:
        return 0, 0
    if not in_file_mapping(weight.untyped_storage().data_ptr()):
        return 0, 0
    return weight.numel() * weight.element_size(), weight.shape[1] * weight.element_size()


def own_head(model: nn.Module) -> None:
    """Copy the head's weight into this process's memory. Loaded in its stored dtype it is a
    view of the checkpoint's file mapping; every token reads the whole head, and under a memory
    cap the streamed layers' pages evicted its file pages, so each token read it from disk
    again. (Where the loader converted it, the copy is one more pass at load, not worth telling
    apart.) The plan counts the head as resident either way; a tied embedding is the same
    parameter and looks its rows up in the copy. The copy is made a slice at a time
    (:func:`row_slices`), so the load holds the head about once, not twice."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type == "cpu":
        source = weight.detach()
        copy = torch.empty(source.shape, dtype=source.dtype)
        for start, part in row_slices(source):
            copy[start:start + part.shape[0]] = part
        weight.data = copy


# How much of a mapped table :func:`row_slices` holds in memory at a time
SLICE_BYTES = 32 << 20


def row_slices(weight: torch.Tensor) -> "Iterator[tuple[int, torch.Tensor]]":
    """``(first row, rows)`` of ``weight`` in slices of about :data:`SLICE_BYTES`. Where
    ``weight`` is a view of a file mapping, each slice's pages leave this process's memory once
    the caller is done with it (:func:`sli.page_cache.unmap_read_pages`): reading a table
    through to copy or quantize it then holds one slice of it, not all of it beside the result
    (a 7B model's head: 262 MB; Llama 3 70B's: 2.1 GB)."""
    mapped = weight.is_contiguous() and in_file_mapping(weight.data_ptr())
    step = max(1, SLICE_BYTES // max(1, weight[0].numel() * weight.element_size()))
    for start in range(0, weight.shape[0], step):
        part = weight[start:start + step]
        yield start, part
        if mapped:
            unmap_read_pages(part.data_ptr(), part.numel() * part.element_size())


# An int8 head: row-wise int8, no outlier columns (its integer sums make a row's logits the
# same alone and in a batch)
INT8_HEAD = QuantizationConfig(mode="int8", llm_int8_threshold=0)


def quantize_head(model: nn.Module, compute_dtype: torch.dtype) -> bool:
    """Make the head an INT8 :class:`QuantizedLinear` (:data:`INT8_HEAD`); False where the head
    is not a linear this can quantize. Every token reads the whole head: on SmolLM2-135M its
    bfloat16 weight (57 MB) was 4-5 ms of a ~25 ms token and, with the layers, more than the
    last-level cache holds. A tied embedding keeps its own rows; the head's int8 copy is extra
    memory then (half the bfloat16 one), less otherwise.

    The head is quantized from the weight as loaded (a bfloat16 checkpoint's: a view of its file
    mapping), a slice of rows at a time (:func:`row_slices`), never copied or widened whole
    first: a 7B model's head widened to float32 took 524 MB more at load, and copied first 262
    MB, more than its budget's room."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantizedLinear) and head.metadata["codec"] == "none":  # narrow_embeddings' bfloat16 head
        weight = head.qweight.tensors["weight"]
    elif type(head) is nn.Linear:
        weight = head.weight.detach()
    else:
        return False
    bias = head.bias
    # prepared once (its float32 row scales): the head is resident; prepared in each token's
    # product, SmolLM2's head took 1.33-1.55 ms a call, 1.31-1.40 once (docs/benchmarks.md)
    qweight = codec_for(INT8_HEAD.mode).prepare(quantize_rows(weight, INT8_HEAD))
    bias = bias.detach().to(compute_dtype) if bias is not None else None
    model.set_output_embeddings(QuantizedLinear.from_quantized(qweight, bias, compute_dtype))
    return True


def quantize_rows(weight: torch.Tensor, config: QuantizationConfig) -> QuantizedTensor:
    """``codec.quantize(weight, config)`` for a row-wise codec without outlier columns (each
    row's bytes depend on that row alone), a slice of rows at a time (:func:`row_slices`) into
    tensors made once for the whole weight."""
    codec = codec_for(config.mode)
    tensors: Dict[str, torch.Tensor] = {}
    metadata: Dict = {}
    for start, part in row_slices(weight):
        q = codec.quantize(part, config)
        if not tensors:
            tensors = {name: t.new_empty((weight.shape[0],) + tuple(t.shape[1:])) if t.dim() else t
                       for name, t in q.tensors.items()}
            metadata = {**q.metadata, "shape": list(weight.shape)}
        for name, t in q.tensors.items():
            if t.dim():
                tensors[name][start:start + part.shape[0]] = t
    return QuantizedTensor(tensors, metadata)


def narrow_embeddings(model: nn.Module, layers_path: str, compute_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Keep the bfloat16 embedding and head as they are; widen every other shared weight.

    Half the bytes of float32 copies, same results: the head becomes a :class:`QuantizedLinear`
    over its bfloat16 weight (the fused kernel for a token's logits, BLAS for a prompt's), and
    a plain ``nn.Embedding`` widens the rows it looks up. Other modules (norms, scaled
    embeddings) get float32 weights. Returns the head's weight when the state dict no longer
    lists it (an untied head).
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    kept = None
    if type(head) is nn.Linear:
        kept = head.weight.detach()
        qweight = QuantizedTensor({"weight": kept}, {"codec": "none", "shape": list(kept.shape), "dtype": "bfloat16"})
        bias = head.bias.detach().to(compute_dtype) if head.bias is not None else None
        model.set_output_embeddings(QuantizedLinear.from_quantized(qweight, bias, compute_dtype))
    plain_embedding = type(embedding) is nn.Embedding
    if plain_embedding:
        embedding.register_forward_hook(lambda module, args, out: out.to(torch.float32))
    for name, param in model.named_parameters():
        if name.startswith(layers_path + ".") or not param.is_floating_point():
            continue
        if not (plain_embedding and param is embedding.weight):
            param.data = param.data.to(compute_dtype)
    if kept is not None and plain_embedding and embedding.weight.data_ptr() == kept.data_ptr():
        return None  # tied: the state dict counts it once, as the embedding
    return kept
