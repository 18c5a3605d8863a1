"""lstmgen: train a character-level LSTM on Wikipedia text with Ray, and generate articles.

How a command flows: ``cli`` (Typer flags) -> a config dataclass (``config``: one per job, the one
place defaults live) -> the job function (``prepare.prepare``, ``train.train``,
``generate.generate_job``, ``evaluate.evaluate``) -> Ray (Ray Data tasks, Ray Train workers, Ray
actors) on an embedded local Ray or a cluster (``runtime``). ``lstmgen submit`` runs the same
command on a cluster through ``jobs/<job>.py``.

Modules, flat, by what they are about:

- data: ``corpus`` (sources, download, byte chunks, vocabulary), ``windows`` (ids <-> fixed-length
  windows <-> Parquet, and the readers that stream them back), ``prepare`` (the prepare job)
- model: ``model`` (the explicit LSTM and its fused twin), ``sample`` (choosing the next character),
  ``mixture`` (the adaptive count model mixed in at evaluation)
- jobs: ``train`` (driver and Ray Train worker loop), ``generate`` (streaming and batch
  generation), ``evaluate`` (held-out bits per character), ``report`` (loss.png and a summary)
- cluster: ``runtime`` (start or join Ray), ``capacity`` (can the cluster hold the job),
  ``submit`` (Ray Jobs client), ``rehearse`` (a cluster.yaml-shaped cluster on one machine),
  ``cli_cluster`` (the submit, jobs and cluster commands)
- shared: ``config`` (job dataclasses, presets), ``storage`` (local and S3 paths),
  ``checkpoint`` (safe save, load, verify, copy), ``lease`` (one writer per run), ``errors``
  (``LstmgenError`` and the one-line message), ``cli`` (the command line)
"""

__version__ = "0.1.0"
