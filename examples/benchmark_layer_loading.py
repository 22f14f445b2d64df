"""Time getting a layer from the cache: memory tier, disk tier, and the dequantization.

    python examples/benchmark_layer_loading.py          # default model
    python examples/benchmark_layer_loading.py --tiny   # small random model
"""
import argparse
import tempfile
import time

import torch

from sli import QuantizationConfig, UniversalSLIProcessor
from sli.quantization import dequantize_cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sli-example-") as workdir:  # removed when the example ends
        if args.tiny:
            from sli.synth import synth_model

            model_dir = synth_model(f"{workdir}/model", family="llama", preset="tiny")
        else:
            from sli.default_model import ensure_default_model

            model_dir = ensure_default_model()

        print(f"{'mode':6} {'disk get ms':>12} {'memory get ms':>14} {'dequant ms':>11} {'entry MB':>9}")
        for mode in ("none", "int8", "nf4"):
            config = QuantizationConfig(mode=mode)
            with UniversalSLIProcessor(model_dir, config, cache_dir=f"{workdir}/cache",
                                       max_memory_cache_size_gb=1.0) as processor:
                processor.prewarm(progress=False)
                cache, model_id = processor.cache, processor.model_id
                cache.delete(model_id, 0, config)
                processor.prewarm(progress=False)  # layer 0 written again, not yet in the memory tier
                t0 = time.perf_counter()
                entry = cache.get(model_id, 0, config)  # disk hit, promoted to memory
                t1 = time.perf_counter()
                cache.get(model_id, 0, config)  # memory hit
                t2 = time.perf_counter()
                dequantize_cached(entry, torch.float32)
                t3 = time.perf_counter()
                print(f"{mode:6} {1e3 * (t1 - t0):12.2f} {1e3 * (t2 - t1):14.3f} {1e3 * (t3 - t2):11.2f} "
                      f"{entry.nbytes / 1e6:9.2f}")


if __name__ == "__main__":
    main()
