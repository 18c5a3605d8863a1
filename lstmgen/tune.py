"""Tune job: a hyperparameter search over ``lstmgen train``, on Ray Tune.

Each trial is an ordinary training run: the trial function calls the same ``train`` driver as
``lstmgen train`` (its own Ray Train workers, its own lease, checkpoints and metrics) with the
run directory ``RUN/trials/<trial id>/``, and Tune's report callback passes rank 0's metrics
rows to Tune. Every ``train`` flag sets the fixed part of a trial's config; ``--search
NAME=SPEC`` draws the rest. Successive halving (Tune's ASHA scheduler) compares trials on
validation bpc at equal shares of the budget (``budget_used`` in each row: the larger of the step
and time fractions, as the LR schedule counts it) and stops the ones behind. At the end,
``RUN/trials.json`` holds the table and ``RUN/best.json`` the best trial's config, which
``lstmgen train --config`` takes.

Layout of RUN: ``search.json`` (this search), ``tune/`` (Tune's own state: ``--resume`` restores
it), ``trials/<id>/`` (the runs), ``trials.json``, ``best.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, fields

from lstmgen import lease, storage
from lstmgen.config import NOT_IN_A_CONFIG_FILE, TrainConfig, TuneConfig
from lstmgen.errors import LstmgenError

KINDS = ("loguniform", "uniform", "randint", "choice")


def parse_search(specs: list[str], base: TrainConfig) -> dict[str, tuple[str, list]]:
    """``NAME=KIND:ARGS`` -> {name: (kind, values)}, each value checked as TrainConfig checks it.

    loguniform:LO:HI and uniform:LO:HI (float settings), randint:LO:HI (int settings, HI
    excluded, as Tune draws), choice:A,B,C (any setting)."""
    types = {f.name: str(f.type) for f in fields(TrainConfig) if f.name not in NOT_IN_A_CONFIG_FILE}
    parsed: dict[str, tuple[str, list]] = {}
    for spec in specs:
        name, eq, rest = spec.partition("=")
        kind, colon, args = rest.partition(":")
        name = name.strip().replace("-", "_")
        if not eq or not colon or kind not in KINDS:
            raise LstmgenError(f"--search {spec!r}: write NAME=KIND:ARGS with KIND one of {', '.join(KINDS)} "
                               "(e.g. lr=loguniform:3e-3:5e-2, hidden=choice:256,384)")
        if name not in types:
            raise LstmgenError(f"--search {spec!r}: {name!r} is not a train setting")
        if name in parsed:
            raise LstmgenError(f"--search {spec!r}: {name} is searched twice")
        kind_type = types[name]
        try:
            if kind == "choice":
                values = [_value(v.strip(), kind_type) for v in args.split(",") if v.strip()]
                if not values:
                    raise ValueError("no values")
            else:
                lo, hi = (_value(v.strip(), "int" if kind == "randint" else "float") for v in args.split(":"))
                if kind in ("uniform", "loguniform") and kind_type != "float":
                    raise ValueError(f"{name} is {kind_type}: use randint or choice")
                if kind == "randint" and kind_type != "int":
                    raise ValueError(f"{name} is {kind_type}: use uniform, loguniform or choice")
                if not lo < hi:
                    raise ValueError(f"needs LO < HI (got {lo}, {hi})")
                if kind == "loguniform" and lo <= 0:
                    raise ValueError("loguniform needs LO > 0")
                values = [lo, hi - 1 if kind == "randint" else hi]
        except ValueError as exc:
            raise LstmgenError(f"--search {spec!r}: {exc}") from None
        for value in values:  # every bound and choice must make a config train accepts
            try:
                TrainConfig(**{**asdict(base), name: value})
            except LstmgenError as exc:
                raise LstmgenError(f"--search {spec!r}: {value!r} is no setting ({exc})") from None
        parsed[name] = (kind, values)
    if not parsed:
        raise LstmgenError("--search: give at least one NAME=KIND:ARGS")
    return parsed


def _value(text: str, kind: str):
    if kind == "int":
        return int(text)
    if kind == "float":
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} is not a finite number")
        return value
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    return text


def _space(parsed: dict[str, tuple[str, list]]) -> dict:
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(v[0], v[1]), "uniform": lambda v: tune.uniform(v[0], v[1]),
            "randint": lambda v: tune.randint(v[0], v[1] + 1), "choice": lambda v: tune.choice(v)}
    return {name: make[kind](values) for name, (kind, values) in parsed.items()}


def trial(config: dict, base: dict, root: str) -> None:
    """One trial, inside Tune: ``lstmgen train`` with the drawn settings, in RUN/trials/<id>/.
    Restored by ``--resume``, an unfinished trial resumes its own run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lstmgen.train import train

    run = storage.join(root, "trials", tune.get_context().get_trial_id())
    values = {**base, **config, "run": run, "resume": storage.exists(storage.join(run, "train_config.json")),
              "given": sorted(set(base["given"]) | set(config))}
    if values["resume"]:
        lease.wait_until_free(run)  # its holder before the interruption may have died on another node
    # Ray Train gives a worker group 60 s to start. A trial may have to wait longer: for the workers
    # of a trial just stopped to go (their placement group is removed by Ray Train's cleaner, which
    # can lag on a loaded machine) or for nodes to join. It waits as long as --wait-timeout says.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(base["wait_timeout"])  # Ray Train passes it to the controller
    metrics = train(TrainConfig(**values), callbacks=(TuneReportCallback(),))
    tune.report({**metrics, "finished": True})  # only a trial the scheduler let run to its end gets here


def check(cfg: TuneConfig, embedded: bool) -> dict[str, tuple[str, list]]:
    """Everything that can be refused before Ray starts: the search, the data, the run directory,
    and on this machine alone (embedded Ray) the cores."""
    from lstmgen.windows import check_prepared

    base = cfg.train
    parsed = parse_search(cfg.search, base)
    check_prepared(base.data, ("train", "valid"))
    storage.require_prefix(cfg.run)
    storage.check_bucket(cfg.run)
    if cfg.resume and not storage.exists(storage.join(cfg.run, "search.json")):
        raise LstmgenError(f"{cfg.run}: nothing to resume (no search.json)")
    if not cfg.resume and storage.exists(cfg.run) and storage.list_dir(cfg.run):
        raise LstmgenError(f"{cfg.run}: already exists; pass --resume to continue its search or choose another --run")
    need = cfg.max_concurrent * base.workers
    if embedded and need > (os.cpu_count() or 1):
        raise LstmgenError(f"--max-concurrent {cfg.max_concurrent} x --workers {base.workers} = {need} workers, more than "
                           f"this machine's {os.cpu_count()} cores hold; lower one of them")
    return parsed


def run_search(cfg: TuneConfig, parsed: dict[str, tuple[str, list]]) -> list[dict]:
    """The driver, after ``check``: the cluster's capacity, then the Tuner (new or restored), then
    the table and best.json."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from lstmgen import capacity

    base = cfg.train
    bundle, _ = capacity.bundle_for(base.gpu)
    capacity.require("tune", bundle, cfg.max_concurrent * base.workers, base.wait_timeout)  # more trials at once than it can hold
    capacity.require_shared_storage({"--data": base.data, "--run": cfg.run}, base.shared_fs)
    saved = storage.join(cfg.run, "search.json")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune prints nothing: the trials' own lines and the table speak
    fs, path = storage.resolve(storage.join(cfg.run, "tune"))
    trainable = tune.with_resources(tune.with_parameters(trial, base=asdict(base), root=cfg.run),
                                    {"CPU": 0.01})  # the trial only drives its Ray Train workers, which take their own
    if cfg.resume:
        print(f"tune: resuming the search in {cfg.run}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        storage.write_text(saved, json.dumps({**asdict(cfg), "train": asdict(base)}, indent=1))
        baseline = [{name: getattr(base, name) for name in parsed}] if cfg.baseline else None  # trial 0: the config as given
        scheduler = ASHAScheduler(time_attr="budget_used", metric="val_bpc", mode="min", max_t=1.0 + 1e-6,  # a trial ends itself
                                  grace_period=cfg.grace, reduction_factor=cfg.reduction)
        tuner = tune.Tuner(
            trainable,
            param_space=_space(parsed),
            tune_config=tune.TuneConfig(num_samples=cfg.trials, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=cfg.search_seed, points_to_evaluate=baseline,
                                                                         max_concurrent=cfg.max_concurrent),
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name="tune", storage_path=path.rsplit("/", 1)[0], storage_filesystem=fs, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    print(f"tune: {cfg.trials} trials, {cfg.max_concurrent} at a time, {base.workers} worker(s) each; searching "
          + ", ".join(f"{n}={k}:{v}" for n, (k, v) in parsed.items()))
    results = tuner.fit()
    table = summarize(cfg.run, results, list(parsed))
    if base.mlflow:
        from lstmgen import tracking

        tracking.end_unfinished(base.mlflow, {r["run"]: "KILLED" if r["status"] == "stopped early" else "FAILED"
                                              for r in table if r["status"] != "finished"})
    return table


def summarize(root: str, results, searched: list[str]) -> list[dict]:
    """The trials table (RUN/trials.json) and the best trial's config (RUN/best.json), from each
    trial's own metrics.jsonl."""
    from lstmgen.report import read_metrics

    table = []
    for result in results:
        trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]  # trial_dirname_creator: the trial id
        run = storage.join(root, "trials", trial_id)
        row = {"trial": trial_id, "run": run, "config": {k: result.config.get(k) for k in searched}}
        try:
            history = read_metrics(run)
        except LstmgenError:
            history = []
        if history:
            best = min(history, key=lambda r: r["val_bpc"])
            row.update(steps=history[-1]["step"], best_val_bpc=best["val_bpc"], budget_used=history[-1].get("budget_used", 0.0))
        row["status"] = ("error: " + str(result.error).strip().splitlines()[-1][:200] if result.error
                         else "finished" if (result.metrics or {}).get("finished") else "stopped early")
        table.append(row)
    table.sort(key=lambda r: r.get("best_val_bpc", math.inf))
    storage.write_text(storage.join(root, "trials.json"), json.dumps(table, indent=1))
    scored = [r for r in table if "best_val_bpc" in r]
    if scored:
        chosen = json.loads(storage.read_text(storage.join(scored[0]["run"], "train_config.json")))
        best = {k: v for k, v in chosen.items() if k not in NOT_IN_A_CONFIG_FILE}
        storage.write_text(storage.join(root, "best.json"), json.dumps(best, indent=1))
    return table


def table_text(table: list[dict]) -> str:
    names = sorted({k for r in table for k in r["config"]})
    head = ["trial", *names, "steps", "best valid bpc", "status"]
    rows = [[r["trial"], *(_fmt(r["config"].get(n)) for n in names), str(r.get("steps", "-")),
             f"{r['best_val_bpc']:.3f}" if "best_val_bpc" in r else "-", r["status"]] for r in table]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows])


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
