"""Run generator training in this process and write a checksum of its final weights (for torchrun tests)."""

import argparse
import hashlib
import os
import sys
from pathlib import Path

from parscale_ear_hf.training.generator import add_arguments, run

if __name__ == "__main__":
    args = add_arguments(argparse.ArgumentParser()).parse_args(sys.argv[1:])
    model = run(args)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    Path(args.output_dir, f"weights-rank{rank}.sha256").write_text(digest.hexdigest())
