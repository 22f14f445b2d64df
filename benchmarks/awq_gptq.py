"""AWQ-style per-channel scaling, alone and before GPTQ (issue 15): a standalone prototype on
SmolLM2-135M, not sli's calibration path (which has no AWQ step; docs/benchmarks.md says why).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/awq_gptq.py VARIANT [LAYERS] [TOKENS]
    VARIANT: rtn | gptq | awq-rtn | awq-gptq   (NF4 bs64, the preset's GPTQ settings;
    LAYERS: the first LAYERS decoder layers only; TOKENS: calibration tokens, default 32768)

Layer by layer in float32: the layer's inputs are the previous layers' outputs with their
weights already quantized (as sli's calibration streams them). AWQ: for each group of linears
reading one input (q/k/v after input_layernorm, gate/up after post_attention_layernorm, down
after up), s = mean|x|^alpha (normalized), alpha from a grid by the group's output error after
rounding W*s to NF4; 1/s is folded into the norm's weight (q/k/v, gate/up) or into up_proj's
rows (down). o_proj is left (GQA: its input is not one channel per v_proj row). GPTQ then runs
on the scaled weights with the Hessians of the scaled inputs (one float pass, as sli's default).
Perplexity on the first 4x512 tokens of pydoc_data.topics and of IDLE's manual.
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sli.calibration.text import default_calibration_text
from sli.default_model import ensure_default_model
from sli.evaluation import load_eval_text, perplexity
from sli.quantization import QuantizationConfig, codec_for
from sli.quantization.gptq import gptq_quantize

VARIANTS = ("rtn", "gptq", "awq-rtn", "awq-gptq")
if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
    sys.exit(f"usage: awq_gptq.py VARIANT [LAYERS] [TOKENS], VARIANT one of {', '.join(VARIANTS)}")
variant = sys.argv[1]
n_layers = int(sys.argv[2]) if len(sys.argv) > 2 else None
tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32768
torch.manual_seed(0)
md = ensure_default_model()
tok = AutoTokenizer.from_pretrained(md)
model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
RTN = QuantizationConfig(mode="nf4")
GPTQ = QuantizationConfig(mode="nf4", method="gptq")
codec = codec_for("nf4")
ALPHAS = [i / 20 for i in range(21)]
SEARCH_TOKENS = 4096
CH = 8  # windows a forward

# linears that read one input, in the order they run
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
texts = {name or "pydoc": tok(load_eval_text(name), add_special_tokens=False, verbose=False)["input_ids"]
         for name in (None, "idle-help")}


def ppl(m):
    return {k: perplexity(lambda w: m(w).logits, ids) for k, ids in texts.items()}


ref = ppl(model)
calib = torch.tensor(tok(default_calibration_text(), add_special_tokens=False, verbose=False)["input_ids"][:tokens]).view(-1, 512)
layers = model.model.layers
if n_layers is None:
    n_layers = len(layers)

# the layers' other arguments, for a chunk of CH windows
seen = {}


class _Stop(Exception):
    pass


def _rec(*args, **kwargs):
    seen.update(kwargs)
    raise _Stop


layers[0].forward = _rec
try:
    with torch.no_grad():
        model(input_ids=calib[:CH], use_cache=False)
except _Stop:
    pass
del layers[0].forward
kwargs = {k: v for k, v in seen.items() if k != "hidden_states"}


def run(layer, x):
    out = []
    for c in range(0, x.shape[0], CH):
        y = layer(x[c:c + CH], **kwargs)
        out.append(y[0] if isinstance(y, tuple) else y)
    return torch.cat(out)


def rtn(w):
    return codec.dequantize(codec.quantize(w, RTN), torch.float32)


def awq(layer, x):
    """Scales for (q/k/v), (gate/up), (down), folded into the layer in place."""
    grab = {}
    names = {"self_attn.q_proj": "qkv", "mlp.gate_proj": "gu", "mlp.down_proj": "down"}
    def keep(key):
        def hook(m, a):
            grab.setdefault(key, a[0].reshape(-1, a[0].shape[-1])[:SEARCH_TOKENS].clone())
        return hook

    hooks = [layer.get_submodule(p).register_forward_pre_hook(keep(key)) for p, key in names.items()]
    run(layer, x[:SEARCH_TOKENS // 512])
    for h in hooks:
        h.remove()
    groups = {"qkv": GROUPS[0], "gu": GROUPS[2], "down": GROUPS[3]}
    chosen = {}
    for key, paths in groups.items():
        xs = grab[key]
        mean = xs.abs().mean(0)
        ws = [layer.get_submodule(p).weight.data for p in paths]
        refs = [xs @ w.t() for w in ws]
        best = None
        for a in ALPHAS:
            s = mean.pow(a).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = sum(float((r - xs @ (rtn(w * s) / s).t()).square().sum()) for w, r in zip(ws, refs))
            if best is None or err < best[0]:
                best = (err, a, s)
        _, a, s = best
        chosen[key] = a
        for w in ws:
            w.mul_(s)
        if key == "qkv":
            layer.input_layernorm.weight.data.div_(s)
        elif key == "gu":
            layer.post_attention_layernorm.weight.data.div_(s)
        else:
            layer.mlp.up_proj.weight.data.div_(s.unsqueeze(1))
    return chosen


def gptq(layer, x):
    H = {g[0]: torch.zeros(layer.get_submodule(g[0]).weight.shape[1], layer.get_submodule(g[0]).weight.shape[1])
         for g in GROUPS}

    def add(key):
        def hook(m, a):
            v = a[0].reshape(-1, a[0].shape[-1])
            H[key].addmm_(v.t(), v)
        return hook

    hooks = [layer.get_submodule(g[0]).register_forward_pre_hook(add(g[0])) for g in GROUPS]
    run(layer, x)
    for h in hooks:
        h.remove()
    for g in GROUPS:
        q = gptq_quantize({p: layer.get_submodule(p).weight.data for p in g}, H[g[0]], GPTQ)
        for p in g:
            layer.get_submodule(p).weight.data.copy_(codec.dequantize(q[p], torch.float32))


t0 = time.time()
with torch.no_grad():
    x = model.model.embed_tokens(calib)
    for i in range(n_layers):
        layer = layers[i]
        alphas = awq(layer, x) if variant.startswith("awq") else None
        if variant.endswith("gptq"):
            gptq(layer, x)
        else:
            for p in (p for g in GROUPS for p in g):
                w = layer.get_submodule(p).weight.data
                w.copy_(rtn(w))
        x = run(layer, x)
        print(f"layer {i} {alphas or ''} {time.time() - t0:.0f}s", flush=True)
out = ppl(model)
print(variant, f"layers {n_layers}, {tokens} tokens:", {k: f"{100 * (out[k] / ref[k] - 1):+.2f}%" for k in out},
      "ref", {k: round(v, 3) for k, v in ref.items()}, flush=True)
