"""The transformers adapter: the one place that knows transformers' internals."""
import inspect
import warnings

import pytest
import torch

from sli import transformers_adapter as hf
from sli.errors import SLIError


@pytest.mark.parametrize("function, params", hf.internals_used(), ids=lambda v: getattr(v, "__name__", ""))
def test_each_internal_takes_the_parameters_sli_passes(function, params):
    # An upgrade that renames or drops one fails here, not deep inside a forward pass.
    signature = inspect.signature(function)
    missing = [p for p in params if p not in signature.parameters]
    assert not missing, f"{function.__qualname__} no longer takes {missing}"


@pytest.mark.parametrize("version, ok", [("5.16.0", True), ("5.24.0", True), ("5.99.1", True),
                                         ("5.15.2", False), ("4.56.0", False), ("6.0.0", False)])
def test_version_outside_the_supported_range_is_one_line_naming_it(version, ok):
    if ok:
        hf.check_transformers_version(version)
        return
    with pytest.raises(SLIError) as info:
        hf.check_transformers_version(version)
    message = str(info.value)
    assert "\n" not in message and f"transformers>={hf.SUPPORTED_TRANSFORMERS[0]},<" in message and version in message


def test_cache_argument_is_the_one_the_forward_takes(model_factory):
    model = hf.build_skeleton(hf.load_config(model_factory("llama")), torch.float32)
    name = hf.cache_argument(model)
    assert name in inspect.signature(model.forward).parameters


def test_streamed_generation_raises_no_deprecation_warning(model_factory, tmp_path):
    # transformers renames arguments with a deprecation period: sli must use the new names.
    from sli import UniversalSLIProcessor

    with UniversalSLIProcessor(model_factory("llama"), "int8", cache_dir=tmp_path, device="cpu") as proc:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            proc.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]
