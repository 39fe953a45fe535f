"""Count the parameters of the ImageNet-256 default configs, write results JSON, refresh the README table.

python examples/param_counts.py --output results/param_counts.json --readme README.md
"""

import argparse

from parscale_ear_hf.info import default_parameter_counts, parameter_table
from parscale_ear_hf.results import update_readme, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="results/param_counts.json", help="results JSON to write")
    parser.add_argument("--readme", default=None, help="README whose `param-table` section to regenerate")
    args = parser.parse_args()

    counts = default_parameter_counts()
    write_results(args.output, {"metric": "parameter_count", "configs": "ImageNet-256 defaults", **counts})
    table = parameter_table(counts["components"])
    print(table)
    if args.readme:
        update_readme(
            args.readme,
            "param-table",
            f"{table}\n\n_Written by `python examples/param_counts.py` to `{args.output}`._",
        )


if __name__ == "__main__":
    main()
