"""The benchmarks measure what they say they measure (they are run by hand; these check their
set-up, not their figures)."""
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

# from_ram on a small weight with torch on one thread, then the thread count torch reports
FROM_RAM_ON_ONE_THREAD = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("kernels_benchmark", {str(BENCHMARKS / "kernels.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
torch.set_num_threads(1)
weight = (torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
module.from_ram(weight, ["int8"], copies=2, repeats=1)
print("threads after:", torch.get_num_threads())
"""


def test_kernels_from_ram_keeps_the_thread_count_it_was_given():
    # its numba floor reader (parallel=True) once reset OpenMP's thread count, which torch and so
    # sli's kernels read: `--threads 1 --from-ram` timed the kernels on every core. In a process of
    # its own: numba's OpenMP threads would stay in the test session's
    result = subprocess.run([sys.executable, "-c", FROM_RAM_ON_ONE_THREAD], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| int8 |" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "threads after: 1"
