"""Sweep hyperparameters on a Ray cluster with Ray Tune; each trial fits a TorchTrainer.

    ray submit cluster.yaml pipelines/tune.py -- --data SHARDS --space tune_configs/lr_sweep.yaml --run-dir RUN \
        --workers-per-trial 1 --gpus-per-worker 1
    ray job submit --working-dir . -- python pipelines/tune.py --data SHARDS --space tune_configs/lr_sweep.yaml \
        --run-dir RUN

Takes the arguments of ``raypets tune``; joins the cluster through $RAY_ADDRESS or --address.
"""

import sys

from raypets.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
