"""A run's curves in TensorBoard and MLflow: the event files read back with TensorBoard's own
reader, and an MLflow run logged to a real ``mlflow server`` (SQLite backend store, artifacts
served by the server) started here on loopback."""

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import prepare_slice, run_cli
from .s3server import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_slice(tmp_path_factory.mktemp("tracking"), 100_000)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (work / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                               "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read():
                break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (work / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_to_tensorboard_and_mlflow_the_rows_of_metrics_jsonl(data, mlflow_server, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--data", str(data), "--run", str(run), "--preset", "tiny", "--workers", "1", "--max-steps", "60",
                     "--eval-every", "20", "--checkpoint-every", "40", "--mlflow", mlflow_server, "--mlflow-experiment", "wiki",
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == [20, 40, 60]
    assert [bool(r.get("sample")) for r in rows] == [False, True, True]  # a sample with each checkpoint

    # TensorBoard: the event file, read by TensorBoard's own loader, holds what metrics.jsonl holds.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    for key, tag in (("train_bpc", "bpc/train"), ("val_bpc", "bpc/valid"), ("lr", "lr"), ("chars_per_s", "chars_per_s")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [r["step"] for r in rows], tag
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    texts = events.Tensors("sample/text_summary")
    assert [t.step for t in texts] == [40, 60]
    assert texts[-1].tensor_proto.string_val[0].decode() == rows[-1]["sample"]
    report = run_cli("report", str(run))
    assert f"tensorboard --logdir {run / 'tb'}" in report.stdout

    # MLflow: one run with the config as params, every row's numbers by step, the final checkpoint, FINISHED.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("wiki")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.params["hidden"] == "128" and logged.data.params["max_steps"] == "60"
    for key in ("train_bpc", "val_bpc", "lr", "chars_per_s"):
        history = sorted(client.get_metric_history(logged.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[key])) for r in rows], key
    names = sorted(a.path for a in client.list_artifacts(logged.info.run_id, "checkpoint"))
    assert names == ["checkpoint/meta.json", "checkpoint/model.pt"]
    local = client.download_artifacts(logged.info.run_id, "checkpoint/model.pt", str(tmp_path))
    assert Path(local).read_bytes() == (run / "checkpoint_0000060" / "model.pt").read_bytes()

    # --resume continues the same MLflow run.
    resumed = run_cli("train", "--data", str(data), "--run", str(run), "--resume", "--max-steps", "80", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == logged.info.run_id
    steps = [m.step for m in client.get_metric_history(logged.info.run_id, "val_bpc")]
    assert sorted(steps) == [20, 40, 60, 80]


def test_a_search_ends_the_mlflow_runs_of_the_trials_it_stopped(mlflow_server, tmp_path):
    """Tune ends a trial stopped early where it is, so its run never finishes its MLflow run: the
    search marks those KILLED (a died trial's FAILED), and leaves a finished run as it is."""
    from mlflow.tracking import MlflowClient

    from lstmgen import tracking

    runs = {name: str(tmp_path / name) for name in ("stopped", "died", "finished", "elsewhere")}
    ids = {name: tracking.start_mlflow(mlflow_server, "search", run, {"lr": 0.01}) for name, run in runs.items()}
    client = MlflowClient(tracking_uri=mlflow_server)
    client.set_terminated(ids["finished"], status="FINISHED")
    (tmp_path / "elsewhere" / "mlflow.json").write_text(json.dumps({"uri": "http://127.0.0.1:9", "run_id": ids["elsewhere"]}))
    tracking.end_unfinished(mlflow_server, {runs["stopped"]: "KILLED", runs["died"]: "FAILED", runs["finished"]: "KILLED",
                                            runs["elsewhere"]: "KILLED", str(tmp_path / "no-mlflow"): "KILLED"})
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"stopped": "KILLED", "died": "FAILED", "finished": "FINISHED", "elsewhere": "RUNNING"}


def test_without_mlflow_nothing_of_it_is_imported_and_a_config_file_trains(data, tmp_path):
    settings = tmp_path / "best.json"  # as `lstmgen tune` writes it; the flags given win
    settings.write_text(json.dumps({"hidden": 40, "embed": 12, "lr": 0.01, "max_steps": 500}))
    code = ("import sys\nfrom lstmgen.cli import main\n"
            f"sys.argv = ['lstmgen', 'train', '--data', {str(data)!r}, '--run', {str(tmp_path / 'run')!r}, '--preset', 'tiny',"
            f" '--config', {str(settings)!r}, '--workers', '1', '--max-steps', '20', '--eval-every', '20']\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "import lstmgen.train, lstmgen.tune, lstmgen.tracking\n"
            "print('mlflow imported:', any(m == 'mlflow' or m.startswith('mlflow.') for m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlflow imported: False" in result.stdout
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["hidden"], saved["embed"], saved["lr"], saved["max_steps"]) == (40, 12, 0.01, 20)
    assert [r["step"] for r in _rows(tmp_path / "run")] == [20]
