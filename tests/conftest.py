import os

import pytest
import torch

# Tests run on small random models built locally; nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# The same arithmetic on every CPU the suite meets: float32 prompts and sli's own INT8 kernels.
# The matrix-unit paths a CPU with AMX takes by default (bfloat16 prompts, INT8 in
# torch._int_mm) have tests of their own that force them (test_codecs, test_kernels, test_processor).
os.environ.setdefault("SLI_PROMPT_DTYPE", "float32")
os.environ.setdefault("SLI_INT8_MATMUL", "numba")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Builds (once per session) a tiny random model of a family, saved in bf16."""
    from sli.synth import synth_model

    made = {}

    def make(family: str = "llama", preset: str = "tiny", **kwargs):
        key = (family, preset, tuple(sorted(kwargs.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"{family}-{preset}")
            made[key] = synth_model(out, family=family, preset=preset, **kwargs)
        return made[key]

    return make


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (`pytest -m cuda` runs only these)")
