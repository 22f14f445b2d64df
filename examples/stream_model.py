"""Stream a model layer by layer with UniversalSLIProcessor.

    python examples/stream_model.py                 # the default model (SmolLM2-135M)
    python examples/stream_model.py --tiny          # a small random model, built locally
"""
import argparse
import tempfile

import torch

from sli import QuantizationConfig, UniversalSLIProcessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use a small random model instead of the default one")
    parser.add_argument("--mode", default="nf4")
    parser.add_argument("--memory-budget-gb", type=float, default=0.1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sli-example-") as workdir:  # removed when the example ends
        if args.tiny:
            from sli.synth import synth_model

            model_dir, prompt = synth_model(f"{workdir}/model", family="llama", preset="tiny"), torch.arange(1, 9)
        else:
            from sli.default_model import ensure_default_model

            model_dir, prompt = ensure_default_model(), "The capital of France is"

        processor = UniversalSLIProcessor(model_dir, QuantizationConfig(mode=args.mode), cache_dir=f"{workdir}/cache",
                                          memory_budget_gb=args.memory_budget_gb)
        new_ids = processor.generate(prompt, max_new_tokens=8)
        print(processor.plan.describe())
        if args.tiny:
            print("new token ids:", new_ids[0].tolist())
        else:
            print(prompt + processor.tokenizer().decode(new_ids[0], skip_special_tokens=True))
        processor.close()


if __name__ == "__main__":
    main()
