"""Write a pipeline's model card (<model>/README.md) from its evaluation results files.

python examples/make_model_card.py --model models/mnist_demo --results results/eval/mnist_demo.json
python examples/make_model_card.py --model runs/gen/pipeline --model-id org/name --dataset ILSVRC/imagenet-1k \
    --results results/eval/imagenet256.json
python examples/make_model_card.py --model models/mnist_demo --grid-cell lh_both ...   # + the grid's runs over seeds
Then `pipe.save_pretrained(folder, push_to_hub=True, repo_id=...)` uploads the folder with this card.
"""

import argparse

from parscale_ear_hf import ParScaleEARPipeline
from parscale_ear_hf.commands import run_script
from parscale_ear_hf.model_card import add_arguments, run
from research.evidence_grid.model_card_grid import cell_card_section


def main(args: argparse.Namespace) -> None:
    section = None
    if args.grid_cell:
        section = cell_card_section(
            args.grid_results_dir, args.grid_cell, ParScaleEARPipeline.from_pretrained(args.model)
        )
    run(args, grid_section=section)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument(
        "--grid-cell",
        default=None,
        help="the evidence grid's cell this configuration is (examples/experiments.py): adds its scores over seeds",
    )
    parser.add_argument("--grid-results-dir", default="results", help="holds experiments/<cell>/seed<k>.json")
    run_script(parser, main)
