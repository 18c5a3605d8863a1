"""Cluster entrypoint for `lstmgen tune`: `python jobs/tune.py ARGS` takes exactly the CLI's
arguments (the same config dataclass is built from them), joins the cluster in RAY_ADDRESS and
runs the job. `lstmgen submit tune ARGS` submits this file through the Ray Jobs API."""

import sys

from lstmgen.cli import main

if __name__ == "__main__":
    sys.argv = ["lstmgen", "tune", *sys.argv[1:]]
    main()
