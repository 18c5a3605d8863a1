"""The ``lstmgen`` command line (Typer).

Each job command builds its config dataclass and runs the job on an embedded local Ray (or the
cluster in ``--address`` / ``RAY_ADDRESS``). ``lstmgen submit JOB ...`` sends the same command to
a cluster's job server instead (the cluster commands live in ``cli_cluster``). Every error prints
one line (``errors.error_line``) and exits 1.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback
from typing import Optional

import typer

from lstmgen import (
    __version__,
    runtime,  # noqa: F401  (first: it sets the environment Ray reads at import)
    storage,
)
from lstmgen.cli_cluster import SUBMIT_SETTINGS, cluster_app, jobs_app, submit
from lstmgen.config import (
    PRESETS,
    WIKITEXT2_SHA256,
    WIKITEXT2_URL,
    EvaluateConfig,
    GenerateConfig,
    PrepareConfig,
    SampleConfig,
    TrainConfig,
    TuneConfig,
    default,
    parse_workers,
    train_config,
)
from lstmgen.errors import LstmgenError, error_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train a character-level LSTM on Wikipedia text with Ray, and generate articles.")
checkpoints_app = typer.Typer(no_args_is_help=True, help="List and copy a run's checkpoints.")
app.add_typer(checkpoints_app, name="checkpoints")

S3_ENDPOINT = typer.Option(None, "--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL.")
ADDRESS = typer.Option(None, "--address", help="Drive the job from here on this Ray cluster (GCS address HOST:6379) "
                       "instead of an embedded Ray. A job server URL belongs to `lstmgen submit`.")
SHARED_FS = typer.Option(False, "--shared-fs", help="Local paths are on a filesystem mounted on every node (EFS, NFS); "
                        "otherwise a multi-node cluster needs s3://.")
def D(name: str) -> str:  # noqa: N802  (reads as a tag in the option lists below)
    return default(TrainConfig, name).replace("[", "\\[")  # the help is rich markup, where [x] is a tag


WAIT_TIMEOUT = typer.Option(GenerateConfig.wait_timeout, "--wait-timeout",
                            help="Seconds to wait for the cluster to offer the job's resources.")


def _setup(s3_endpoint: Optional[str], address: Optional[str] = None, workers: int = 0, ray: bool = True,
           then: tuple[str, ...] = ()) -> None:
    """``then``: the job's own modules, imported while Ray starts (``init_ray``)."""
    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
    if ray:
        from lstmgen.runtime import init_ray

        init_ray(workers=workers, address=address, then=then)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lstmgen {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    pass


@app.command()
def prepare(
    out: str = typer.Option(..., "--out", help="Output directory (local or s3://)."),
    corpus: Optional[list[str]] = typer.Option(None, "--corpus", help="Corpus file(s) or a WikiText directory; "
                                               "repeat for several files. Default: download WikiText-2 raw."),
    seq_len: int = typer.Option(PrepareConfig.seq_len, "--seq-len", help="Characters per training window."),
    valid_fraction: float = typer.Option(PrepareConfig.valid_fraction, "--valid-fraction",
                                          help="Tail fraction held out when no valid split is given."),
    chunk_mb: float = typer.Option(PrepareConfig.chunk_mb, "--chunk-mb", help="Bytes of corpus per Ray Data task (MiB)."),
    url: str = typer.Option(WIKITEXT2_URL, "--url", envvar="LSTMGEN_WIKITEXT_URL", help="WikiText archive URL."),
    sha256: str = typer.Option(WIKITEXT2_SHA256, "--sha256", envvar="LSTMGEN_WIKITEXT_SHA256", help="Expected SHA-256 of the archive."),
    cache_dir: str = typer.Option(PrepareConfig.cache_dir, "--cache-dir", envvar="LSTMGEN_CACHE", help="Download cache."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace prepared data already at --out."),
    shared_fs: bool = SHARED_FS,
    s3_endpoint: Optional[str] = S3_ENDPOINT,
    address: Optional[str] = ADDRESS,
) -> None:
    """Corpus -> vocabulary + Parquet windows (train/, valid/, test/, vocab.json, manifest.json)."""
    cfg = PrepareConfig(out=storage.absolute(out), corpus=[storage.absolute(c) for c in corpus or []],
                        seq_len=seq_len, valid_fraction=valid_fraction,
                        chunk_mb=chunk_mb, url=url, sha256=sha256, cache_dir=cache_dir, overwrite=overwrite,
                        shared_fs=shared_fs)
    _setup(s3_endpoint, address)
    from lstmgen.prepare import prepare as run_prepare

    run_prepare(cfg)


@app.command()
def train(
    data: str = typer.Option(..., "--data", help="Directory written by lstmgen prepare."),
    run: str = typer.Option(..., "--run", help="Run directory for checkpoints and metrics (local or s3://)."),
    preset: str = typer.Option("", "--preset", help=f"Named recipe: {', '.join(PRESETS)}. Flags override it."),
    workers: Optional[str] = typer.Option(None, "--workers", help="Data-parallel Ray Train workers: N, or MIN-MAX to "
                                          "grow and shrink with the cluster (elastic). " + D("workers")),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--cpu", help="One GPU per worker. \\[default: cpu]"),
    wait_timeout: Optional[float] = typer.Option(None, "--wait-timeout", help=f"{WAIT_TIMEOUT.help} " + D("wait_timeout")),
    shared_fs: Optional[bool] = typer.Option(None, "--shared-fs", help=SHARED_FS.help),
    cell: Optional[str] = typer.Option(None, "--cell", help="explicit (gates in Python) or fused (nn.LSTM/cuDNN). " + D("cell")),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or bf16 (mixed precision: bf16 matmuls, "
                                            "fp32 weights and states). \\[default: bf16 on a GPU or on a CPU with bf16 "
                                            "instructions (AMX, AVX-512 BF16), else fp32]"),
    embed: Optional[int] = typer.Option(None, "--embed", help="Embedding size. " + D("embed")),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="LSTM hidden size. " + D("hidden")),
    layers: Optional[int] = typer.Option(None, "--layers", help="LSTM layers. " + D("layers")),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Locked dropout between layers and before the head. " + D("dropout")),
    embed_dropout: Optional[float] = typer.Option(None, "--embed-dropout", help="Locked dropout on the embeddings. " + D("embed_dropout")),
    weight_drop: Optional[float] = typer.Option(None, "--weight-drop", help="DropConnect on the hidden-to-hidden weights "
                                                "(one mask per batch, explicit cell). " + D("weight_drop")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per worker per step. " + D("batch_size")),
    carry_state: Optional[bool] = typer.Option(None, "--carry-state/--shuffle-windows",
                                               help="Carry the LSTM state across batches (TBPTT) or train on shuffled windows."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate. " + D("lr")),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay. " + D("weight_decay")),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps. " + D("warmup_steps")),
    lr_floor: Optional[float] = typer.Option(None, "--lr-floor", help="Where the cosine ends, as a fraction of --lr. " + D("lr_floor")),
    clip: Optional[float] = typer.Option(None, "--clip", help="Gradient-norm clip. " + D("clip")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps. " + D("max_steps")),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop after this many minutes (0: off). " + D("max_minutes")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed. " + D("seed")),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validate every N steps. " + D("eval_every")),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every",
                                                    help="Checkpoint every N steps. \\[default: with each evaluation]"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Progress line every N steps. " + D("log_every")),
    val_chars: Optional[int] = typer.Option(None, "--val-chars", help="Validation characters scored in training. " + D("val_chars")),
    keep: Optional[int] = typer.Option(None, "--keep", help="Best checkpoints kept (plus the latest). " + D("keep")),
    max_failures: Optional[int] = typer.Option(None, "--max-failures", help="Worker-group restarts allowed. " + D("max_failures")),
    mlflow: Optional[str] = typer.Option(None, "--mlflow", help="MLflow tracking URI: params, metrics and the final checkpoint "
                                         'go there too (pip install -e ".[mlflow]").'),
    mlflow_experiment: Optional[str] = typer.Option(None, "--mlflow-experiment", help="MLflow experiment. " + D("mlflow_experiment")),
    config_file: Optional[str] = typer.Option(None, "--config", help="A JSON file of settings (e.g. a search's best.json); "
                                              "flags given here win over it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run at --run from its latest checkpoint."),
    s3_endpoint: Optional[str] = S3_ENDPOINT,
    address: Optional[str] = ADDRESS,
) -> None:
    """Train the LSTM with Ray Train; checkpoints, metrics.jsonl, loss.png and TensorBoard events go to --run."""
    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint  # a --config on S3 is read before Ray starts
    cfg = _train_config(locals())
    from lstmgen import steptime

    steptime.mark("cli")
    _setup(s3_endpoint, address, workers=max(cfg.workers, cfg.workers_max), then=("lstmgen.train",))
    steptime.mark("ray")
    from lstmgen.train import train as run_train

    metrics = run_train(cfg)
    typer.echo(f"train: done at step {metrics.get('step')}, validation {metrics.get('val_bpc', float('nan')):.3f} bpc; "
               f"lstmgen report {run}")


def _tune_options(
    run: str = typer.Option(..., "--run", help="The search's directory: a run per trial in trials/, trials.json, best.json."),
    search: list[str] = typer.Option(..., "--search", help="NAME=KIND:ARGS, repeated: any train setting, KIND one of "
                                     "loguniform:LO:HI, uniform:LO:HI, randint:LO:HI, choice:A,B,C (e.g. lr=loguniform:3e-3:5e-2)."),
    trials: int = typer.Option(TuneConfig.trials, "--trials", help="Trials drawn from the search space."),
    max_concurrent: int = typer.Option(TuneConfig.max_concurrent, "--max-concurrent", help="Trials training at once."),
    grace: float = typer.Option(TuneConfig.grace, "--grace", help="Share of its budget a trial trains before it can be stopped."),
    reduction: int = typer.Option(TuneConfig.reduction, "--reduction", help="At each rung, 1 in this many trials goes on."),
    search_seed: int = typer.Option(TuneConfig.search_seed, "--search-seed", help="Seed of the draws."),
    baseline: bool = typer.Option(TuneConfig.baseline, "--baseline/--no-baseline",
                                  help="The first trial trains the searched settings as the flags (or defaults) give them."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted search in --run."),
) -> None:
    pass


def tune(**given) -> None:
    """Search train settings on Ray Tune: each trial is a training run (every train flag is the
    fixed part of its config), successive halving stops those behind on validation bpc; the
    table is printed, and RUN/best.json is a --config for train."""
    if given.get("s3_endpoint"):
        os.environ["AWS_ENDPOINT_URL"] = given["s3_endpoint"]
    base = _train_config({**given, "resume": False})
    cfg = TuneConfig(run=storage.absolute(given["run"]), train=base, search=list(given["search"]), trials=given["trials"],
                     max_concurrent=given["max_concurrent"], grace=given["grace"], reduction=given["reduction"],
                     search_seed=given["search_seed"], baseline=given["baseline"], resume=given["resume"])
    from lstmgen import tune as search

    parsed = search.check(cfg, embedded=not (given.get("address") or os.environ.get("RAY_ADDRESS")))  # before Ray starts
    # Embedded Ray: logical CPUs beyond the trials' workers, one for Ray Data and one per trial, so a
    # trial never waits for the placement group of a trial stopped before it to be removed (Ray
    # Train's cleaner removes it, minutes late on a loaded machine). What trains at once is still
    # --max-concurrent x --workers, which `check` held to the cores.
    _setup(None, given.get("address"), workers=cfg.max_concurrent * base.workers + 1 + cfg.trials, then=("lstmgen.train",))
    table = search.run_search(cfg, parsed)
    typer.echo(search.table_text(table))
    best = storage.join(cfg.run, "best.json")
    typer.echo(f"tune: {sum(r['status'] == 'stopped early' for r in table)} of {len(table)} trials stopped early; "
               + (f"the best's config: {best} (lstmgen train --config {best} ...)" if storage.exists(best) else "no trial scored"))


_TUNE_OWN = inspect.signature(_tune_options, eval_str=True).parameters
tune.__signature__ = inspect.Signature([*_TUNE_OWN.values(), *(p for name, p in inspect.signature(train, eval_str=True).parameters.items()
                                                               if name not in _TUNE_OWN)])
app.command()(tune)


def _train_config(given: dict) -> TrainConfig:
    """The TrainConfig of ``train``'s flags (``tune`` takes the same ones): the preset, then the
    --config file, then the flags given."""
    from lstmgen.config import NOT_IN_A_CONFIG_FILE, settings_file

    flags = {k: v for k, v in given.items() if k in TrainConfig.__dataclass_fields__ and k not in NOT_IN_A_CONFIG_FILE}
    flags["workers"], flags["workers_max"] = parse_workers(given["workers"]) if given.get("workers") is not None else (None, None)
    path = given.get("config_file")
    settings = settings_file(path, storage.read_text(path)) if path else None
    return train_config(given.get("preset") or "", settings, data=storage.absolute(given["data"]), run=storage.absolute(given["run"]),
                        resume=given.get("resume", False), **flags)


@app.command()
def generate(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Run directory (its best checkpoint) or one checkpoint."),
    prime: str = typer.Option(GenerateConfig.prime, "--prime", help="Text to start from."),
    article: str = typer.Option("", "--article", help="Write an article: prime with the heading ' = TITLE = '."),
    primes_file: str = typer.Option("", "--primes-file", help="One prime per line (or JSONL); runs a batch job."),
    num_samples: int = typer.Option(GenerateConfig.num_samples, "--num-samples", help="Samples per prime (batch job)."),
    out: str = typer.Option("", "--out", help="Batch output file, .jsonl or .parquet (local or s3://)."),
    fmt: str = typer.Option("", "--format", help="jsonl or parquet (default: from --out)."),
    length: int = typer.Option(SampleConfig.length, "--length", help="Maximum characters to generate per sample."),
    temperature: float = typer.Option(SampleConfig.temperature, "--temperature", help="Softmax temperature (> 0)."),
    top_k: int = typer.Option(SampleConfig.top_k, "--top-k", help="Sample among the k most likely characters (0: off)."),
    top_p: float = typer.Option(SampleConfig.top_p, "--top-p", help="Nucleus sampling mass in (0, 1] (1: off)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely character."),
    seed: int = typer.Option(SampleConfig.seed, "--seed", help="Job seed; each sample's own seed is derived from it and written out."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop a sample when it produces this string (repeatable)."),
    until_next_article: bool = typer.Option(False, "--until-next-article", help="Stop where the next ' = Title = ' starts."),
    batch_size: int = typer.Option(GenerateConfig.batch_size, "--batch-size", help="Rows generated together by one actor."),
    concurrency: int = typer.Option(GenerateConfig.concurrency, "--concurrency", help="Generation actors."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per actor."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    wait_timeout: float = WAIT_TIMEOUT,
    shared_fs: bool = SHARED_FS,
    s3_endpoint: Optional[str] = S3_ENDPOINT,
    address: Optional[str] = ADDRESS,
) -> None:
    """Stream one sample to the terminal, or (with --primes-file/--out) run a batch generation job."""
    sampling = SampleConfig(length=length, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                            seed=seed, stop=list(stop or []), until_next_article=until_next_article)
    cfg = GenerateConfig(checkpoint=storage.absolute(checkpoint), prime=prime.replace("\\n", "\n"), article=article,
                         primes_file=storage.absolute(primes_file), num_samples=num_samples, out=storage.absolute(out), format=fmt,
                         batch_size=batch_size, concurrency=concurrency, gpu=gpu, overwrite=overwrite,
                         wait_timeout=wait_timeout, shared_fs=shared_fs, sampling=sampling)
    from lstmgen import generate as gen

    if cfg.out or cfg.primes_file or cfg.num_samples > 1:
        if not cfg.out:
            raise LstmgenError("a batch job (--primes-file or --num-samples > 1) needs --out FILE.jsonl|.parquet")
        _setup(s3_endpoint, address, workers=concurrency)
        gen.generate_job(cfg)
    else:
        _setup(s3_endpoint, ray=False)
        gen.stream(cfg)


@app.command()
def pipeline(
    corpus: Optional[list[str]] = typer.Option(None, "--corpus", help="Corpus file(s) or WikiText directory. "
                                               "Default: download WikiText-2 raw."),
    workdir: str = typer.Option("lstmgen-run", "--workdir", help="Where data/, run/ and the sample go."),
    minutes: float = typer.Option(TrainConfig.max_minutes, "--minutes", help="Training time budget."),
    workers: int = typer.Option(TrainConfig.workers, "--workers", help="Ray Train workers."),
    prime: str = typer.Option("I plan to make the world a better place", "--prime", help="Prime for the sample."),
    length: int = typer.Option(SampleConfig.length, "--length", help="Characters to generate."),
    s3_endpoint: Optional[str] = S3_ENDPOINT,
) -> None:
    """The main job in one command: corpus -> prepare -> train -> generate, on an embedded Ray."""
    from lstmgen.prepare import prepare as run_prepare

    root = storage.absolute(workdir)
    data, run = storage.join(root, "data"), storage.join(root, "run")
    sampling = SampleConfig(length=length)
    _setup(s3_endpoint, workers=workers, then=("lstmgen.train", "lstmgen.generate"))
    from lstmgen import generate as gen
    from lstmgen.train import train as run_train

    if not storage.exists(storage.join(data, "manifest.json")):
        run_prepare(PrepareConfig(out=data, corpus=[storage.absolute(c) for c in corpus or []]))
    run_train(train_config(data=data, run=run, workers=workers, max_minutes=minutes,
                           resume=storage.exists(storage.join(run, "train_config.json"))))
    typer.echo(f"\n--- sample: the prime and {length} generated characters ---")
    gen.stream(GenerateConfig(checkpoint=run, prime=prime, sampling=sampling))
    typer.echo(f"\npipeline: data in {data}, run in {run} (lstmgen report {run})")


@app.command()
def evaluate(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Run directory (its best checkpoint) or one checkpoint."),
    data: str = typer.Option(..., "--data", help="Directory written by lstmgen prepare."),
    split: str = typer.Option(EvaluateConfig.split, "--split", help="train, valid or test."),
    rows: int = typer.Option(EvaluateConfig.rows, "--rows", "--streams", help="Rows the split is cut into, scored side by side."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Dynamic evaluation: a gradient step after scoring each segment."),
    segment: int = typer.Option(EvaluateConfig.segment, "--segment", help="Characters per dynamic-evaluation step."),
    dynamic_lr: float = typer.Option(EvaluateConfig.dynamic_lr, "--dynamic-lr",
                                     help="Dynamic-evaluation step size (in gradient RMS units)."),
    dynamic_decay: float = typer.Option(EvaluateConfig.dynamic_decay, "--dynamic-decay",
                                        help="Pull toward the trained weights per step (times gradient RMS)."),
    mix_counts: int = typer.Option(EvaluateConfig.mix_counts, "--mix-counts",
                                  help="Also mix with an adaptive count model of contexts up to this order (10)."),
    mix_lr: float = typer.Option(EvaluateConfig.mix_lr, "--mix-lr", help="Online step size of the mixture's gate."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    s3_endpoint: Optional[str] = S3_ENDPOINT,
) -> None:
    """Bits per character of a checkpoint on a prepared split, state carried through the text."""
    _setup(s3_endpoint, ray=False)
    from lstmgen.evaluate import evaluate as run_evaluate

    result = run_evaluate(EvaluateConfig(checkpoint=checkpoint, data=data, split=split, rows=rows, dynamic=dynamic,
                                         segment=segment, dynamic_lr=dynamic_lr, dynamic_decay=dynamic_decay,
                                         mix_counts=mix_counts, mix_lr=mix_lr))
    if as_json:
        typer.echo(json.dumps(result))
    else:
        kind = "dynamic " if result["dynamic"] else ""
        typer.echo(f"{result['split']}: {result['bpc']:.4f} {kind}bits per character over {result['chars']:,} chars "
                   f"(step {result['step']}, {result['checkpoint']})")
        if "mixture_bpc" in result:
            typer.echo(f"{result['split']}: {result['count_bpc']:.4f} bpc count model alone (orders 0-{mix_counts}), "
                       f"{result['mixture_bpc']:.4f} bpc LSTM + count-model mixture")


@app.command()
def report(run: str = typer.Argument(..., help="Run directory."), s3_endpoint: Optional[str] = S3_ENDPOINT) -> None:
    """Summary of a run and the path of its loss curve (loss.png)."""
    _setup(s3_endpoint, ray=False)
    from lstmgen.report import summary

    typer.echo(summary(run))


@checkpoints_app.command("list")
def checkpoints_list(run: str = typer.Argument(..., help="Run directory (local or s3://)."),
                     s3_endpoint: Optional[str] = S3_ENDPOINT) -> None:
    """A table of the run's checkpoints: step, validation bpc, size, which is best and latest."""
    _setup(s3_endpoint, ray=False)
    from lstmgen import checkpoint as ck

    if not storage.exists(run):
        raise LstmgenError(f"{run}: no such run directory")
    entries = [ck.verify(e) for e in ck.list_checkpoints(run)]  # a damaged one is marked, never best or latest
    if not entries:
        raise LstmgenError(f"{run}: no checkpoints")
    chosen, latest = ck.best(entries), max((e.step for e in entries if not e.error), default=None)
    typer.echo(f"{'step':>8}  {'val bpc':>8}  {'size':>9}  {'':11}  path")
    for e in entries:
        size = sum(f.size for f in storage.list_dir(e.path) if f.type.name == "File")
        tags = ",".join(t for t, on in (("best", e is chosen), ("latest", e.step == latest)) if on) or e.error
        bpc = f"{e.val_bpc:8.4f}" if e.val_bpc is not None else f"{'-':>8}"
        typer.echo(f"{e.step:8d}  {bpc}  {size / 1e6:7.2f}MB  {tags:11}  {e.path}")


@checkpoints_app.command("copy")
def checkpoints_copy(src: str = typer.Argument(..., help="Run or checkpoint directory."),
                     dst: str = typer.Argument(..., help="Destination directory (local or s3://)."),
                     overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty destination."),
                     s3_endpoint: Optional[str] = S3_ENDPOINT) -> None:
    """Copy a run or one checkpoint between local disk and S3, verified file by file before it
    appears at the destination."""
    _setup(s3_endpoint, ray=False)
    from lstmgen.checkpoint import copy_verified

    files, size = copy_verified(storage.absolute(src), storage.absolute(dst), overwrite=overwrite)
    typer.echo(f"copied {files} file(s), {size / 1e6:.2f} MB: {src} -> {dst} (sizes and SHA-256 verified)")


# The cluster commands (lstmgen/cli_cluster.py): submit, jobs, cluster.
app.command(context_settings=SUBMIT_SETTINGS)(submit)
app.add_typer(jobs_app, name="jobs")
app.add_typer(cluster_app, name="cluster")


def main() -> None:
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as its return value here
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.exceptions.TyperException as exc:  # a flag of the wrong type, unknown or missing: one line
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {' '.join(message.split())} (see {ctx.command_path if ctx else 'lstmgen'} --help)", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into a line
        if os.environ.get("LSTMGEN_DEBUG"):
            traceback.print_exc()
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            try:  # flush Ray's forwarded logs first, so the error is the last line printed
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
