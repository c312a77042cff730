"""Predict a folder of images on a Ray cluster with Ray Data (CPU decode tasks, a model actor per GPU, HDF5 out).

    ray submit cluster.yaml pipelines/predict.py -- --checkpoint RUN INPUT OUTPUT --gpu
    ray job submit --working-dir . -- python pipelines/predict.py --config config_pets_inference.json

Takes the arguments of ``raypets predict``; joins the cluster through $RAY_ADDRESS or --address.
"""

import sys

from raypets.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
