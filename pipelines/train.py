"""Train on a Ray cluster with Ray Train.

    ray submit cluster.yaml pipelines/train.py -- --data SHARDS --run-dir RUN --workers 4 --gpu
    ray job submit --working-dir . -- python pipelines/train.py --config config_pets_segmentation.json

Takes the arguments of ``raypets train``; joins the cluster through $RAY_ADDRESS or --address.
"""

import sys

from raypets.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
