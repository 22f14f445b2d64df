"""Configs, the layer quantizer, the adaptive quantizer, presets and the registry."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from sli import (AdaptiveQuantizer, LayerQuantizer, QuantizationConfig, QuantizationMode, QuantizationRegistry,
                 QuantizedLinear, dequantize_layer, get_fp4_config, get_int8_config, get_mixed_precision_config,
                 get_nf4_config, quantize_layer)
from sli.quantization import dequantize_cached


def block(seed=0):
    """A small transformer-block-shaped module: attention and MLP linears, a norm, an embedding."""
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "self_attn": nn.ModuleDict({"q_proj": nn.Linear(128, 128, bias=False), "o_proj": nn.Linear(128, 128)}),
        "mlp": nn.ModuleDict({"up_proj": nn.Linear(128, 256, bias=False), "down_proj": nn.Linear(256, 128)}),
        "norm": nn.LayerNorm(128),
        "embed_tokens": nn.Embedding(10, 128),
    })


# -- QuantizationMode -------------------------------------------------------------

@pytest.mark.parametrize("text, mode", [("nf4", QuantizationMode.NF4), ("NF4", QuantizationMode.NF4),
                                        ("int8_dynamic", QuantizationMode.INT8_DYNAMIC), ("FP8", QuantizationMode.FP8)])
def test_mode_from_string(text, mode):
    assert QuantizationMode(text) is mode


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid modes: none, int8, int8_dynamic, nf4, fp4, int4, fp8"):
        QuantizationMode("int3")


# -- QuantizationConfig -----------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "nf4", "quant_type": "fp4"}, "quant_type"),         # contradicts the mode
    ({"quant_type": "int2"}, "quant_type"),                       # not a 4-bit type
    ({"block_size": 48}, "block_size"),                           # not a power of two
    ({"group_size": 7}, "group_size"),                            # odd: two values a byte
    ({"compute_dtype": "float64"}, "compute_dtype"),              # not a compute dtype
    ({"quant_storage_dtype": torch.int8}, "quant_storage_dtype"),
    ({"double_quant": False, "compress_statistics": True}, "double_quant"),  # one switch, two names
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantizationConfig(**kwargs)


def test_config_round_trips_through_json():
    config = QuantizationConfig(mode="int4", compute_dtype=torch.bfloat16, group_size=64,
                                llm_int8_skip_modules=["lm_head"])
    restored = QuantizationConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert config.to_dict()["mode"] == "int4" and config.to_dict()["compute_dtype"] == "bfloat16"


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown QuantizationConfig fields"):
        QuantizationConfig.from_dict({"mode": "nf4", "bits": 3})


@pytest.mark.parametrize("base, change", [
    (QuantizationConfig(mode="nf4"), {"mode": "fp4", "quant_type": None}),
    (QuantizationConfig(mode="nf4"), {"block_size": 128}),
    (QuantizationConfig(mode="nf4"), {"block_sizes": {"q_proj": 32}}),
    (QuantizationConfig(mode="nf4"), {"double_quant": False, "compress_statistics": False}),
    (QuantizationConfig(mode="int8"), {"llm_int8_threshold": 4.0}),
    (QuantizationConfig(mode="int4"), {"group_size": 64}),
    (QuantizationConfig(mode="int8"), {"llm_int8_skip_modules": ["lm_head"]}),
    (QuantizationConfig(mode="none"), {"mode": "int8"}),
])
def test_fingerprint_changes_with_every_byte_relevant_field(base, change):
    assert dataclasses.replace(base, **change).fingerprint() != base.fingerprint()


@pytest.mark.parametrize("config, change", [
    (QuantizationConfig(mode="nf4"), {"compute_dtype": torch.bfloat16}),   # bytes on disk do not depend on it
    (QuantizationConfig(mode="int4"), {"block_size": 128}),                # int4 has no 4-bit blocks
    (QuantizationConfig(mode="fp8"), {"llm_int8_threshold": 1.0}),
])
def test_fingerprint_ignores_fields_that_do_not_change_bytes(config, change):
    assert dataclasses.replace(config, **change).fingerprint() == config.fingerprint()


def test_fingerprint_is_stable_across_processes():
    # A cache directory outlives the process: the same config must give the same key.
    assert QuantizationConfig(mode="nf4").fingerprint() == QuantizationConfig.from_dict(
        QuantizationConfig(mode="nf4").to_dict()).fingerprint()
    assert len(QuantizationConfig().fingerprint()) == 16


def test_compute_dtype_defaults_to_float32_on_cpu():
    assert QuantizationConfig().resolved_compute_dtype("cpu") == torch.float32


# -- LayerQuantizer ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["none", "int8", "int8_dynamic", "nf4", "fp4", "int4", "fp8"])
def test_quantize_layer_replaces_linears_only(mode):
    layer = block()
    x = torch.randn(3, 128)
    quantizer = LayerQuantizer(QuantizationConfig(mode=mode))
    quantizer.quantize_layer(layer)
    linears = [m for m in layer.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 4
    assert isinstance(layer["norm"], nn.LayerNorm) and isinstance(layer["embed_tokens"], nn.Embedding)
    assert layer["self_attn"]["o_proj"].bias is not None
    assert quantizer.is_quantized(layer)
    y = layer["mlp"]["down_proj"](layer["mlp"]["up_proj"](x))
    assert y.shape == (3, 128) and y.dtype == torch.float32


def test_dequantize_layer_gives_plain_linears_with_the_dequantized_weight():
    layer = LayerQuantizer(QuantizationConfig(mode="nf4")).quantize_layer(block())
    q = layer["mlp"]["up_proj"]
    expected = q.dequantized_weight()
    LayerQuantizer().dequantize_layer(layer)
    assert not LayerQuantizer.is_quantized(layer)
    assert type(layer["mlp"]["up_proj"]) is nn.Linear
    assert torch.equal(layer["mlp"]["up_proj"].weight, expected)


def test_some_linears_take_a_block_size_of_their_own_by_name():
    # the rest in blocks of 32; o_proj by its name, the MLP's down_proj by its dotted tail
    config = QuantizationConfig(mode="nf4", block_size=32, block_sizes={"o_proj": 64, "mlp.down_proj": 128})
    layer = LayerQuantizer(config).quantize_layer(block(), layer_name="model.layers.0")
    maxima = {path: layer[part][name].qweight.tensors["weight.absmax"].numel()
              for path, (part, name) in {"q": ("self_attn", "q_proj"), "o": ("self_attn", "o_proj"),
                                         "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}.items()}
    assert maxima == {"q": 128 * 128 // 32, "o": 128 * 128 // 64, "up": 256 * 128 // 32, "down": 128 * 256 // 128}
    reference = block()["self_attn"]["o_proj"]  # o_proj's bytes are what blocks of 64 give it alone
    alone = quantize_layer(reference, QuantizationConfig(mode="nf4"))
    assert torch.equal(alone.dequantized_weight(), layer["self_attn"]["o_proj"].dequantized_weight())
    assert QuantizationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_some_int4_linears_take_a_group_size_of_their_own_by_name():
    # the 64/192 mix that divides SmolLM2's 576-wide inputs at 4.25 bits a weight, on the SIMD kernels' 64s
    config = QuantizationConfig(mode="int4", group_size=64, block_sizes={"gate_proj": 192, "up_proj": 192})
    layer = LayerQuantizer(config).quantize_layer(block(), layer_name="model.layers.0")
    groups = {name: layer[part][name].qweight.metadata["group_size"]
              for part, name in (("self_attn", "q_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))}
    assert groups == {"q_proj": 64, "up_proj": 192, "down_proj": 64}
    reference = block()["mlp"]["up_proj"]  # up_proj's bytes are what groups of 192 give it alone
    alone = quantize_layer(reference, QuantizationConfig(mode="int4", group_size=192))
    assert torch.equal(alone.dequantized_weight(), layer["mlp"]["up_proj"].dequantized_weight())
    assert config.fingerprint() != QuantizationConfig(mode="int4", group_size=64).fingerprint()


@pytest.mark.parametrize("fields, message", [
    ({"mode": "int8", "block_sizes": {"q_proj": 64}}, "mode='int8' has neither"),
    ({"mode": "nf4", "block_sizes": {"q_proj": 48}}, "give linear names each a power of two"),
    ({"mode": "nf4", "block_sizes": {"": 64}}, "give linear names each a power of two"),
    ({"mode": "int4", "block_sizes": {"q_proj": 97}}, "give linear names each an even number >= 2"),
])
def test_block_sizes_by_name_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantizationConfig(**fields)


def test_skip_modules_stay_unquantized():
    config = QuantizationConfig(mode="int8", llm_int8_skip_modules=["o_proj", "mlp.down_proj"])
    layer = LayerQuantizer(config).quantize_layer(block(), layer_name="model.layers.0")
    assert type(layer["self_attn"]["o_proj"]) is nn.Linear
    assert type(layer["mlp"]["down_proj"]) is nn.Linear
    assert isinstance(layer["self_attn"]["q_proj"], QuantizedLinear)


@pytest.mark.parametrize("mode, low, high", [
    ("none", 1.0, 1.0),
    ("int8", 0.25, 0.30),    # fp32 source: 1 byte of 4, plus per-row scales and fp32 norms/biases
    ("nf4", 0.12, 0.17),
])
def test_size_ratio_comes_from_bytes_held(mode, low, high):
    layer = block()
    quantizer = LayerQuantizer(QuantizationConfig(mode=mode))
    quantizer.quantize_layer(layer)
    assert low <= quantizer.get_quantized_size_ratio(layer) <= high


def test_cached_form_round_trips_to_the_same_weights():
    quantizer = LayerQuantizer(QuantizationConfig(mode="nf4"))
    layer = quantizer.quantize_layer(block())
    state = dequantize_cached(quantizer.to_cached(layer), torch.float32)
    assert torch.equal(state["mlp.up_proj.weight"], layer["mlp"]["up_proj"].dequantized_weight())
    assert torch.equal(state["norm.weight"], layer["norm"].weight)
    assert torch.equal(state["self_attn.o_proj.bias"], layer["self_attn"]["o_proj"].bias)


def test_gpt2_conv1d_is_quantized_with_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 32)  # weight [in=32, out=96]
    nn.init.normal_(conv.weight)
    x = torch.randn(4, 32)
    q = LayerQuantizer(QuantizationConfig(mode="int8")).quantize_layer(conv)
    assert isinstance(q, QuantizedLinear) and q.metadata["shape"] == [96, 32]
    torch.testing.assert_close(q(x), conv(x), atol=0.1, rtol=0.02)  # int8: ~0.4% of each weight's row max
    assert q.dequantized_weight().t().shape == conv.weight.shape


# -- AdaptiveQuantizer ------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.q_proj", "int8"),   # attention
    ("transformer.h.0.attn.c_attn", "int8"),        # GPT-2 attention
    ("model.layers.0.mlp.up_proj", "nf4"),         # feed-forward
    ("transformer.h.0.mlp.c_fc", "nf4"),
    ("model.layers.0.router", "nf4"),              # neither: the base config
])
def test_adaptive_choice_per_module_name(name, expected):
    assert get_mixed_precision_config().config_for(name).mode.value == expected


@pytest.mark.parametrize("base, upgraded", [("nf4", "int8"), ("fp4", "int8"), ("int8", "int8_dynamic"),
                                            ("int8_dynamic", "none")])
def test_adaptive_upgrades_attention_one_step(base, upgraded):
    assert AdaptiveQuantizer(QuantizationConfig(mode=base)).attention_config.mode.value == upgraded


def test_adaptive_quantize_model_uses_both_configs():
    model = get_mixed_precision_config().quantize_model(block())
    assert model["self_attn"]["q_proj"].metadata["codec"] == "int8"
    assert model["mlp"]["up_proj"].metadata["codec"] == "nf4"


def test_adaptive_fingerprint_differs_from_its_base():
    assert get_mixed_precision_config().fingerprint() != get_nf4_config().fingerprint()


# -- presets, registry, one-liners --------------------------------------------------

def test_presets():
    assert get_int8_config().mode is QuantizationMode.INT8 and "lm_head" in get_int8_config().llm_int8_skip_modules
    assert get_nf4_config().double_quant and get_nf4_config().quant_type == "nf4"
    assert get_fp4_config().quant_type == "fp4"


def test_registry_register_get_list_and_unknown():
    custom = QuantizationConfig(mode="int4", group_size=32)
    QuantizationRegistry.register("int4_g32", custom)
    try:
        assert QuantizationRegistry.get("int4_g32") == custom
        assert {"int8", "nf4", "fp4", "int4_g32"} <= set(QuantizationRegistry.list_configs())
        with pytest.raises(KeyError, match="known: none, int8"):
            QuantizationRegistry.get("int3")
    finally:
        QuantizationRegistry.unregister("int4_g32")
    assert "int4_g32" not in QuantizationRegistry.list_configs()


def test_one_line_helpers():
    linear = nn.Linear(64, 64)
    q = quantize_layer(linear, mode="nf4")
    assert isinstance(q, QuantizedLinear) and q.metadata["codec"] == "nf4"
    restored = dequantize_layer(q, compute_dtype=torch.bfloat16)
    assert restored.weight.dtype == torch.bfloat16


def test_a_linear_multiplies_by_the_weight_it_holds_now():
    # qweight's view of the buffers is built once per load: load, unload, .to() and
    # load_state_dict must each drop it, or the module would multiply by a stale weight.
    from sli.quantization import codec_for
    codec, config = codec_for("int8"), QuantizationConfig(mode="int8")
    first, second = torch.randn(64, 128), torch.randn(64, 128)
    module = QuantizedLinear.from_quantized(codec.quantize(first, config), None, torch.float32)
    x = torch.randn(2, 128)

    def close(y, reference):  # int8 error: ~1% of the largest output here
        return (y - reference).abs().max() < 0.05 * reference.abs().max()

    assert close(module(x), x @ first.t())
    module.load(codec.quantize(second, config))
    assert close(module(x), x @ second.t())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["weight"].neg_()  # -W, through load_state_dict
    module.load_state_dict(state, assign=True)  # new tensors, as the layer runner loads
    assert close(module(x), -(x @ second.t()))
    module.to(torch.device("meta"))
    assert module.qweight.tensors["weight"].device.type == "meta"
    module.unload()
    with pytest.raises(RuntimeError, match="no weight loaded"):
        module(x)


def test_a_second_codec_for_a_mode_is_refused():
    from sli.quantization import Codec, codec_for

    with pytest.raises(ValueError, match="already registered"):
        class AnotherNF4(Codec):  # noqa: F841
            mode = QuantizationMode.NF4
    assert type(codec_for("nf4")).__name__ == "NF4Codec"


def test_every_mode_has_a_codec_and_a_preset():
    from sli.quantization import available_modes

    assert available_modes() == [m.value for m in QuantizationMode]
    assert QuantizationRegistry.list_configs()[:len(available_modes())] == available_modes()
    for mode in available_modes():
        assert QuantizationRegistry.get(mode).mode == QuantizationMode(mode)


# -- the reference API as its documents describe it --------------------------------------------

def test_quantize_layer_takes_a_config_or_a_quantizer_as_well_as_a_mode():
    from sli.quantization import LayerQuantizer

    for how in (QuantizationConfig(mode="nf4"), LayerQuantizer(QuantizationConfig(mode="nf4")), "nf4"):
        layer = quantize_layer(nn.Sequential(nn.Linear(64, 64)), how)
        assert layer[0].metadata["codec"] == "nf4"
    assert quantize_layer(nn.Sequential(nn.Linear(64, 64)), QuantizationConfig(mode="nf4"),
                          block_size=128)[0].metadata["blocksize"] == 128


def test_the_mixed_config_registers_round_trips_and_leaves_the_head_alone():
    mixed = get_mixed_precision_config()
    assert AdaptiveQuantizer.from_dict(mixed.to_dict()).fingerprint() == mixed.fingerprint()
    QuantizationRegistry.register("balanced", mixed)
    try:
        assert QuantizationRegistry.get("balanced").fingerprint() == mixed.fingerprint()
    finally:
        QuantizationRegistry.unregister("balanced")
    model = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "up_proj": nn.Linear(64, 64), "lm_head": nn.Linear(64, 64)})
    quantized = AdaptiveQuantizer(get_mixed_precision_config()).quantize_model(model)
    assert quantized["q_proj"].metadata["codec"] == "int8" and quantized["up_proj"].metadata["codec"] == "nf4"
    assert type(quantized["lm_head"]) is nn.Linear


def test_a_built_in_name_cannot_be_registered_over():
    with pytest.raises(ValueError, match="'nf4' is a built-in mode's preset"):
        QuantizationRegistry.register("nf4", QuantizationConfig(mode="int8"))
    assert QuantizationRegistry.get("nf4").mode == QuantizationMode.NF4


def test_get_layer_into_a_module_gives_back_the_layer_quantized_as_stored(model_factory, tmp_path):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sli import LayerCache

    config = AutoConfig.from_pretrained(model_factory("llama"))
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).eval()
    quantized = LayerQuantizer(get_nf4_config()).quantize_layer(layer)
    with LayerCache(tmp_path) as cache:
        cache.cache_layer("m", 0, quantized, "nf4")
        restored = cache.get_layer("m", 0, "nf4", into=LlamaDecoderLayer(config, 0).eval())
    assert LayerQuantizer.is_quantized(restored)
    x = torch.randn(1, 5, config.hidden_size)
    rotary = (torch.ones(1, 5, config.head_dim), torch.zeros(1, 5, config.head_dim))
    with torch.no_grad():
        expected = quantized(x, position_embeddings=rotary, attention_mask=None)
        got = restored(x, position_embeddings=rotary, attention_mask=None)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, expected)
