"""Pre-warm a layer cache directory once, then reuse it from any process.

    python examples/prewarm_cache.py --cache-dir /data/sli-cache            # default model
    python examples/prewarm_cache.py --tiny --cache-dir /tmp/sli-cache       # small random model
"""
import argparse
import tempfile

from sli import LayerCache, UniversalSLIProcessor, get_nf4_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sli-example-") as workdir:  # removed when the example ends
        cache_dir = args.cache_dir or f"{workdir}/cache"
        if args.tiny:
            from sli.synth import synth_model

            model_dir = synth_model(f"{workdir}/model", family="llama", preset="tiny")
        else:
            from sli.default_model import ensure_default_model

            model_dir = ensure_default_model()

        with UniversalSLIProcessor(model_dir, get_nf4_config(), cache_dir=cache_dir) as processor:
            added = processor.prewarm(progress=True)
            again = processor.prewarm(progress=False)  # resumable: nothing left to do
            print(f"{processor.model_id}: {added} layers quantized, {again} on the second run")

        with LayerCache(cache_dir) as cache:  # any later process sees the same entries
            print(cache.stats())


if __name__ == "__main__":
    main()
