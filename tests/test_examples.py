"""Every example runs as is (on a small random model), and every docstring example holds, so the
docs cannot rot."""
import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_leaves_no_files_behind(script, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TQDM_DISABLE": "1",
                                 "HF_HUB_OFFLINE": "1", "TMPDIR": str(scratch)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()
    assert [p.name for p in scratch.iterdir() if p.name.startswith("sli-example-")] == []


def test_there_are_three_examples():
    assert {p.name for p in EXAMPLES} >= {"stream_model.py", "prewarm_cache.py", "benchmark_layer_loading.py"}


SLI = Path(__file__).parent.parent / "sli"
DOCTESTED = sorted(".".join(p.relative_to(SLI.parent).with_suffix("").parts) for p in SLI.rglob("*.py")
                   if re.search(r"^\s*>>> ", p.read_text(encoding="utf-8"), re.MULTILINE))


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_hold(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
