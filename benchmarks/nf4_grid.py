"""NF4's 16 levels on an int8 grid: what it would cost SmolLM2-135M's perplexity.

    python benchmarks/nf4_grid.py [--grid-scale 127]

A byte-sized level table lets a kernel look NF4 codes up with one byte shuffle each 64 values
and multiply them in byte products, as llama.cpp's IQ4_NL does; sli's NF4 kernels use 16-bit
levels (bitsandbytes' levels are not on an int8 grid). This measures, with float block maxima
and no double quantization, every linear of the decoder layers fake-quantized in float32:

- ``nf4``: bitsandbytes' levels (the reference);
- ``int8 grid``: codes chosen against the levels rounded to ``round(level * scale) / scale``
  and read with those same levels (a quantizer that writes the grid it reads);
- ``nf4 codes, int8 levels``: bitsandbytes' codes read with the rounded levels.

on 4 windows of 512 tokens of ``pydoc_data.topics`` and of sli's second evaluation text. The
issue's bound: an int8 level table may move perplexity by at most 0.5% from the float table.
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sli.default_model import ensure_default_model
from sli.evaluation import load_eval_text, perplexity, second_eval_text
from sli.quantization.codecs.four_bit_quantizer import four_bit_code

BLOCK = 64


def fake_quantized(weight: torch.Tensor, pick: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """Each block of ``weight`` coded to the nearest of the levels ``pick`` (times its absmax),
    then read back with ``read``."""
    blocks = weight.float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True).clamp(min=1e-38)
    codes = torch.bucketize((blocks / absmax).clamp(-1, 1), (pick[1:] + pick[:-1]) / 2)
    return (read[codes] * absmax).reshape(weight.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-scale", type=float, default=127.0, help="the grid: round(level * scale) / scale")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = {"pydoc": load_eval_text(), "second": second_eval_text()}
    ids = {name: tokenizer(text, return_tensors="pt").input_ids for name, text in texts.items()}
    original = {name: p.detach().clone() for name, p in model.state_dict().items()}
    levels = four_bit_code("nf4")
    grid = torch.round(levels * args.grid_scale) / args.grid_scale
    variants = {"none": None, "nf4": (levels, levels), "int8 grid": (grid, grid), "nf4 codes, int8 levels": (levels, grid)}
    result = {}
    for name, pair in variants.items():
        model.load_state_dict(original)
        if pair is not None:
            with torch.no_grad():
                for module in model.model.layers.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.copy_(fake_quantized(module.weight, *pair))
        result[name] = {text: perplexity(lambda x: model(x).logits, tokens) for text, tokens in ids.items()}
        against = {text: f"{100 * (v / result['nf4'][text] - 1):+.2f}% vs nf4" for text, v in result[name].items()
                   if "nf4" in result and name != "nf4"}
        print(f"{name:24s}", {text: round(v, 4) for text, v in result[name].items()}, against, flush=True)


if __name__ == "__main__":
    main()
