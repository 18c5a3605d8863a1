"""A run's curves where users already look: TensorBoard event files beside ``metrics.jsonl``, and
an MLflow run when ``--mlflow URI`` is given.

Both are written from the same rows as ``metrics.jsonl``, so the three never disagree. The event
file is rewritten whole from the run's history at every row (a few hundred rows: milliseconds):
after a resume from an earlier checkpoint the history is the checkpoint's, and so are the
curves, with no step logged twice. MLflow is optional (``pip install -e ".[mlflow]"``); nothing
of it is imported unless ``--mlflow`` is given. The driver opens the MLflow run (its id kept in
the run directory, so ``--resume`` continues it), rank 0 logs each row, and the driver logs the
final checkpoint as an artifact and closes the run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lstmgen import storage
from lstmgen.errors import LstmgenError

EVENTS = "events.out.tfevents.lstmgen"  # one file, rewritten; TensorBoard reads any name with "tfevents"
SCALARS = {"train_bpc": "bpc/train", "val_bpc": "bpc/valid", "lr": "lr", "chars_per_s": "chars_per_s"}


def events_dir(run: str) -> str:
    return storage.join(run, "tb")


def write_events(history: list[dict], run: str) -> str:
    """RUN/tb/events.out.tfevents.lstmgen from the metrics rows (and each checkpoint's sample text)."""
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory() as d:
        writer = SummaryWriter(d, flush_secs=3600)
        for row in history:
            when = row.get("time")
            for key, tag in SCALARS.items():
                if isinstance(row.get(key), (int, float)):
                    writer.add_scalar(tag, row[key], row["step"], walltime=when)
            if row.get("sample"):
                writer.add_text("sample", row["sample"], row["step"], walltime=when)
        writer.close()
        (written,) = Path(d).glob("events.out.tfevents.*")
        path = storage.join(events_dir(run), EVENTS)
        storage.write_bytes(path, written.read_bytes())
    return path


# ---------------------------------------------------------------------------------------------
# MLflow


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise LstmgenError('--mlflow needs MLflow: pip install -e ".[mlflow]"') from None
    return MlflowClient(tracking_uri=uri)


def _mlflow_error(uri: str, exc: Exception) -> LstmgenError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LstmgenError(f"--mlflow {uri}: {first[:300]}")


def start_mlflow(uri: str, experiment: str, run: str, params: dict) -> str:
    """The MLflow run for this run directory: the one it already has (``--resume``), or a new one
    with the config as its params. Its id is kept in RUN/mlflow.json."""
    marker = storage.join(run, "mlflow.json")
    client = _client(uri)
    try:
        if storage.exists(marker):
            kept = json.loads(storage.read_text(marker))
            if kept.get("uri") == uri:
                client.update_run(kept["run_id"], status="RUNNING")
                return kept["run_id"]
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        mlflow_run = client.create_run(experiment_id, run_name=run.rstrip("/").rsplit("/", 1)[-1],
                                       tags={"lstmgen.run": run})
        from mlflow.entities import Param

        client.log_batch(mlflow_run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    except LstmgenError:
        raise
    except Exception as exc:  # MlflowException, a refused or dead connection
        raise _mlflow_error(uri, exc) from None
    storage.write_text(marker, json.dumps({"uri": uri, "run_id": mlflow_run.info.run_id}))
    return mlflow_run.info.run_id


def log_row(uri: str, run_id: str, row: dict) -> None:
    """One metrics row; a tracking server that does not answer costs a line, never the run."""
    from mlflow.entities import Metric

    stamp = int(1000 * row.get("time", 0))
    metrics = [Metric(key, float(row[key]), stamp, row["step"]) for key in SCALARS if isinstance(row.get(key), (int, float))]
    try:
        _client(uri).log_batch(run_id, metrics=metrics)
    except Exception as exc:
        print(f"train: could not log to MLflow ({_mlflow_error(uri, exc)})", flush=True)


def end_unfinished(uri: str, runs: dict[str, str]) -> None:
    """A search's trials stopped early never reach ``finish_mlflow`` (Tune ends the trial where it
    is), nor does a trial whose process died: each run directory's MLflow run still RUNNING gets
    the status given (KILLED, MLflow's word for a run stopped; FAILED)."""
    client = _client(uri)
    for run, status in runs.items():
        marker = storage.join(run, "mlflow.json")
        try:
            kept = json.loads(storage.read_text(marker)) if storage.exists(marker) else {}
            if kept.get("uri") == uri and client.get_run(kept["run_id"]).info.status == "RUNNING":
                client.set_terminated(kept["run_id"], status=status)
        except Exception as exc:  # noqa: BLE001  (the search's table is written; a tracking server down costs a line)
            print(f"tune: could not end the MLflow run of {run} ({_mlflow_error(uri, exc)})", flush=True)


def finish_mlflow(uri: str, run_id: str, checkpoint_path: str | None, ok: bool) -> None:
    """The final checkpoint as the run's artifact ``checkpoint/``, and the run's end status."""
    client = _client(uri)
    try:
        if checkpoint_path:
            with tempfile.TemporaryDirectory() as d:
                for info in storage.list_dir(checkpoint_path):
                    if info.type.name == "File":
                        name = info.path.rstrip("/").rsplit("/", 1)[-1]
                        Path(d, name).write_bytes(storage.read_bytes(storage.join(checkpoint_path, name)))
                client.log_artifacts(run_id, d, artifact_path="checkpoint")
        client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    except Exception as exc:
        print(f"train: could not finish the MLflow run ({_mlflow_error(uri, exc)})", flush=True)
