"""Write a pipeline's model card (<model>/README.md) from its evaluation results files.

python examples/make_model_card.py --model models/mnist_demo --results results/eval/mnist_demo.json
python examples/make_model_card.py --model runs/gen/pipeline --model-id org/name --dataset ILSVRC/imagenet-1k \
    --results results/eval/imagenet256.json
python examples/make_model_card.py --model models/mnist_demo --grid-cell lh_both ...   # + the grid's runs over seeds
Then `pipe.save_pretrained(folder, push_to_hub=True, repo_id=...)` uploads the folder with this card.
"""

import argparse
import os

from parscale_ear_hf import ParScaleEARPipeline
from parscale_ear_hf.commands import run_script
from parscale_ear_hf.model_card import add_arguments, write_model_card
from research.evidence_grid.model_card_grid import cell_card_section


def main(args: argparse.Namespace) -> None:
    section = None
    if args.grid_cell:
        pipe = ParScaleEARPipeline.from_pretrained(args.model)
        section = cell_card_section(args.grid_results_dir, args.grid_cell, pipe)
    card = write_model_card(
        args.model,
        args.results,
        model_id=args.model_id,
        datasets=args.dataset,
        license=args.license,
        template_path=args.template,
        force=args.force,
        grid_section=section,
    )
    print(f"wrote {os.path.join(args.model, 'README.md')}: {len(card.data.eval_results or [])} eval results")


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
