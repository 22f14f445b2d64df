"""The CUDA path itself (side stream, pinned copies, events): runs only where a GPU exists.

Its logic (slots, reuse, residency, prefetch order, the plan in dequantized bytes) is tested
on CPU through strategy="dequantize" in tests/test_processor.py.
"""
import pytest
import torch

from sli import QuantizationConfig, UniversalSLIProcessor

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("mode, blocks", [("none", 64), ("int8", 64), ("nf4", 64), ("nf4", 32)])
def test_cuda_streaming_matches_the_cpu_dequantize_strategy(mode, blocks, model_factory, tmp_path):
    model_dir = model_factory("llama", num_layers=4)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    config = QuantizationConfig(mode=mode, compute_dtype="float32", block_size=blocks)  # 32: bitsandbytes >= 0.50
    with UniversalSLIProcessor(model_dir, config, cache_dir=tmp_path / "c", device="cpu", strategy="dequantize",
                               memory_budget_gb=0.0) as cpu:
        expected = cpu.forward(ids)
    with UniversalSLIProcessor(model_dir, config, cache_dir=tmp_path / "c", device="cuda",
                               max_gpu_memory_gb=0.0) as gpu:
        torch.testing.assert_close(gpu.forward(ids).cpu(), expected, atol=1e-4, rtol=1e-4)
        assert gpu.streamer.pool.made <= 2


def test_cuda_peak_memory_stays_within_the_budget(model_factory, tmp_path):
    model_dir = model_factory("llama", num_layers=4)
    budget_gb = 0.05
    torch.cuda.reset_peak_memory_stats()
    with UniversalSLIProcessor(model_dir, "nf4", cache_dir=tmp_path / "c", device="cuda",
                               max_gpu_memory_gb=budget_gb) as proc:
        proc.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[])
    assert torch.cuda.max_memory_allocated() <= budget_gb * 2**30


def test_cuda_streams_layers_from_pinned_host_memory_after_the_first_pass(model_factory, tmp_path):
    model_dir = model_factory("llama", num_layers=4)
    ids = torch.tensor([[1, 2, 3]])
    with UniversalSLIProcessor(model_dir, "int8", cache_dir=tmp_path / "c", device="cuda",
                               max_gpu_memory_gb=0.0) as proc:
        first = proc.forward(ids)
        disk_reads = proc.cache.stats().disk_hits + proc.cache.stats().disk_misses
        second = proc.forward(ids)
        stats = proc.cache.stats()
        assert stats.disk_hits + stats.disk_misses == disk_reads  # every layer came from the host tier
        assert stats.memory_entries == 4
        key = proc.cache.key(proc.model_id, 0, proc.quantizer)
        assert all(t.is_pinned() for t in proc.cache._memory.get(key).tensors.values())
        torch.testing.assert_close(second, first)
