"""Write a pipeline's model card (<model>/README.md) from its evaluation results files.

python examples/make_model_card.py --model models/mnist_demo --results results/eval/mnist_demo.json
python examples/make_model_card.py --model runs/gen/pipeline --model-id org/name --dataset ILSVRC/imagenet-1k \
    --results results/eval/imagenet256.json
Then `pipe.save_pretrained(folder, push_to_hub=True, repo_id=...)` uploads the folder with this card.
"""

import argparse

from parscale_ear_hf.cli import run_script
from parscale_ear_hf.model_card import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)
