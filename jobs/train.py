"""Cluster entrypoint for `lstmgen train`: `python jobs/train.py ARGS` takes exactly the CLI's
arguments (the same config dataclass is built from them), joins the cluster in RAY_ADDRESS and
runs the job. `lstmgen submit train ARGS` submits this file through the Ray Jobs API."""

import sys

from lstmgen.cli import main

if __name__ == "__main__":
    sys.argv = ["lstmgen", "train", *sys.argv[1:]]
    main()
