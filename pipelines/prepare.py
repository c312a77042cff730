"""Prepare a dataset into Parquet shards on a Ray cluster.

    ray submit cluster.yaml pipelines/prepare.py -- SRC OUT [--size 160] ...
    ray job submit --working-dir . -- python pipelines/prepare.py SRC OUT ...

Takes the arguments of ``raypets prepare``; joins the cluster through $RAY_ADDRESS or --address.
"""

import sys

from raypets.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
