"""Checks the command line makes on a model directory before it loads any weights.

sli streams decoder-only causal language models. ``transformers`` maps some encoder models to a
causal-LM class too (``bert`` → ``BertLMHeadModel``), which builds and "generates" from a BERT
masked-LM checkpoint: :func:`check_causal_lm` refuses those with a one-line reason.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import ModelLoadError, UnsupportedArchitectureError

# Encoder (bidirectional) families that transformers also maps to a causal-LM class; such a
# checkpoint is a decoder only when its config says is_decoder=true.
ENCODER_FAMILIES = frozenset({
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
    "nezha", "qdqbert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "xlm-roberta", "xlm-roberta-xl",
    "xmod", "distilbert", "albert", "deberta", "deberta-v2", "mpnet", "modernbert", "esm",
})
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
NEED = "sli needs a decoder-only causal LM (a config.json whose architectures end in ForCausalLM, e.g. LlamaForCausalLM)"


def read_config_json(model_dir: Path) -> Dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir} has no config.json; pass a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path} ({exc}); is it a transformers model?") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object; is it a transformers model?")
    return data


def check_causal_lm(model_dir: Path) -> Dict[str, Any]:
    """The parsed ``config.json`` of a decoder-only causal LM, else an error naming what it is.

    :raises UnsupportedArchitectureError: an encoder (BERT-like without ``is_decoder``), an
        encoder-decoder, a model type transformers has no causal-LM class for, or a config whose
        ``architectures`` are all non-causal heads (``BertForMaskedLM``, ``...ForSequenceClassification``).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_config_json(model_dir)
    model_type = config.get("model_type")
    architectures = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    what = f"{model_dir} holds a {model_type!r} model" + (f" ({', '.join(architectures)})" if architectures else "")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if config.get("is_encoder_decoder") or text.get("is_encoder_decoder"):
        raise UnsupportedArchitectureError(f"{what}, an encoder-decoder; {NEED}")
    if not model_type:
        raise ModelLoadError(f"{model_dir / 'config.json'} names no model_type; is it a transformers model?")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(f"{what}, which transformers has no causal-LM class for; {NEED}")
    if model_type in ENCODER_FAMILIES and not config.get("is_decoder"):
        raise UnsupportedArchitectureError(f"{what}, an encoder (not is_decoder); {NEED}")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not any(a in causal or a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        raise UnsupportedArchitectureError(f"{what}, not a causal LM; {NEED}")
    return config


def max_positions(config: Dict[str, Any]) -> Optional[int]:
    """The longest sequence the model's positions cover (``max_position_embeddings``, GPT-2's
    ``n_positions``, ...), from the text config when there is one; None when the config names none."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for source in (text, config):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def load_tokenizer(model_dir: Path):
    """The model directory's tokenizer, or a one-line error saying how to get one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{model_dir} has no usable tokenizer ({reason}); text prompts need one "
                             "(tokenizer.json, as `sli synth` writes unless --no-tokenizer)") from None
