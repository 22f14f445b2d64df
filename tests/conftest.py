import os

import pytest
import torch

# Tests run on small random models built locally; nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
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
