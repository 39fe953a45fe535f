"""Count the parameters of the ImageNet-256 default configs and write them to a results JSON.

python examples/param_counts.py --output results/param_counts.json
python examples/update_readme.py    # then regenerate the tables of README.md and docs/
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.info import default_parameter_counts, parameter_table
from parscale_ear_hf.results import write_results


def main(args: argparse.Namespace) -> None:
    counts = default_parameter_counts()
    write_results(args.output, {"metric": "parameter_count", "configs": "ImageNet-256 defaults", **counts})
    print(parameter_table(counts["components"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="results/param_counts.json", help="results JSON to write")
    run_script(parser, main)
