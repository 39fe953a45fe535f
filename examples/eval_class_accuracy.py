"""How often a pipeline's digits are recognised as the requested class by the demo digit classifier.

    python examples/eval_class_accuracy.py --model PIPELINE_DIR --classifier models/digit_classifier \
        --images-per-class 50 --steps 16 --guidance 3.0 --temperature 0.7 --seed 0 \
        --results-file results/demo_class_accuracy.json

Image i (class-major) is generated with `torch.Generator().manual_seed(seed + i)`. The classifier
(trained by examples/train_digit_classifier.py on the demo "train" split) must fit the pipeline:
same number of classes, image size and channels; this is checked before anything is generated.
"""

import argparse
import time

import torch

from parscale_ear_hf import ParScaleEARPipeline
from parscale_ear_hf.commands import check_sampling_flags, run_script
from parscale_ear_hf.digit_classifier import DigitClassifier, class_accuracy_of_pipeline
from parscale_ear_hf.results import write_results


def main(args: argparse.Namespace) -> None:
    check_sampling_flags("eval_class_accuracy", args.steps, args.guidance, args.temperature)
    pipe = ParScaleEARPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(args.classifier).to(args.device).eval()
    sampling = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_schedule": args.guidance_schedule,
        "temperature": args.temperature,
    }
    start = time.perf_counter()
    result = class_accuracy_of_pipeline(
        pipe,
        classifier,
        images_per_class=args.images_per_class,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
        **sampling,
    )
    seconds = time.perf_counter() - start
    per_class = " ".join(f"{c}:{a:.2f}" for c, a in enumerate(result["per_class_accuracy"]))
    print(
        f"generated-class accuracy {result['accuracy']:.4f} over {result['num_images']} images "
        f"({seconds:.0f} s on {args.device}); per class {per_class}"
    )
    write_results(
        args.results_file,
        {
            "metric": "generated_class_accuracy",
            "value": result["accuracy"],
            "model": args.model,
            "classifier": args.classifier,
            "judge": "DigitClassifier trained by examples/train_digit_classifier.py; not an ImageNet metric",
            "sampling": {**sampling, "seed": args.seed, "generator": "torch.Generator().manual_seed(seed + i)"},
            **result,
            "seconds": seconds,
            "device": args.device,
        },
    )
    print(f"wrote {args.results_file}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--classifier", default="models/digit_classifier", help="DigitClassifier folder")
    parser.add_argument("--images-per-class", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=64, help="autoregressive steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--guidance-schedule", default="linear", choices=["linear", "constant"])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-file", default="results/demo_class_accuracy.json")
    run_script(parser, main)
