"""Cluster entrypoint for `lstmgen generate`: `python jobs/generate.py ARGS` takes exactly the CLI's
arguments (the same config dataclass is built from them), joins the cluster in RAY_ADDRESS and
runs the job. `lstmgen submit generate ARGS` submits this file through the Ray Jobs API."""

import sys

from lstmgen.cli import main

if __name__ == "__main__":
    sys.argv = ["lstmgen", "generate", *sys.argv[1:]]
    main()
