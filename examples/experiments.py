"""The demo-scale evidence grid: LiteHybrid A1 / A3, ParScale streams against width and depth, the energy head
against MAR's diffusion head and a diffusers DiT, each over three seeds
(examples/research/evidence_grid/experiments.py).

Run the whole grid (resumable: run it again after a kill; finished runs are skipped):
    python examples/experiments.py
Two workers on a 2-core machine (each run is locked by the worker on it):
    OMP_NUM_THREADS=1 python examples/experiments.py & OMP_NUM_THREADS=1 python examples/experiments.py
Some cells or seeds:       python examples/experiments.py --cells lh_off lh_both --seeds 0
Sampling timed alone:      python examples/experiments.py --retime     (once the grid is done; nothing else running)
Tables and plots only:     python examples/experiments.py --report     (results/experiments.{md,png})
The shipped demo model:    python examples/experiments.py --ship       (the best energy-head cell, 4,000 steps)
"""

import argparse

from parscale_ear_hf.commands import run_script
from research.evidence_grid import experiments

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(experiments.add_arguments(parser), experiments.run)
