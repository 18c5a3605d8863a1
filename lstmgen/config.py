"""One dataclass per job. The CLI builds them from flags, the ``jobs/`` entrypoints reuse the CLI,
and Ray workers receive them as plain dicts (``asdict``), so a config crosses process and cluster
boundaries without pickling code. Validation lives here, next to the fields it checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from lstmgen.errors import LstmgenError

# The original release (research.metamind.io) is mirrored byte for byte by ggml-org/ci on Hugging Face.
WIKITEXT2_URL = "https://huggingface.co/datasets/ggml-org/ci/resolve/main/wikitext-2-raw-v1.zip"
# SHA-256 of wikitext-2-raw-v1.zip (4,721,645 bytes). Override with --sha256 or LSTMGEN_WIKITEXT_SHA256.
WIKITEXT2_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"


MAX_SEQ_LEN = 32766  # a window's ``length`` column is int16 and holds up to seq_len + 1


def _check(config, checks: list[tuple[bool, str]]) -> None:
    """Every float field finite (NaN and infinity are no setting), then the job's own checks."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise LstmgenError(f"--{f.name.replace('_', '-')} must be a finite number (got {value})")
    for ok, message in checks:
        if not ok:
            raise LstmgenError(message)


@dataclass
class PrepareConfig:
    out: str
    corpus: list[str] = field(default_factory=list)  # empty: download WikiText-2 raw
    seq_len: int = 64
    valid_fraction: float = 0.1
    chunk_mb: float = 8.0
    url: str = WIKITEXT2_URL
    sha256: str = WIKITEXT2_SHA256
    cache_dir: str = "~/.cache/lstmgen"
    overwrite: bool = False
    shared_fs: bool = False  # local paths are on a filesystem every node mounts (EFS, NFS)

    def __post_init__(self) -> None:
        _check(self, [
            (2 <= self.seq_len <= MAX_SEQ_LEN, f"--seq-len must be in [2, {MAX_SEQ_LEN}] (got {self.seq_len})"),
            (0.0 <= self.valid_fraction < 1.0, f"--valid-fraction must be in [0, 1) (got {self.valid_fraction})"),
            (self.chunk_mb > 0, f"--chunk-mb must be positive (got {self.chunk_mb})"),
        ])


@dataclass
class TrainConfig:
    data: str
    run: str
    workers: int = 2  # data-parallel workers; with workers_max, the fewest to start with
    workers_max: int = 0  # > workers: elastic, grow up to this many as nodes join (0: fixed)
    gpu: bool = False
    wait_timeout: float = 600.0  # seconds to wait for the cluster to offer the workers' resources
    shared_fs: bool = False  # local --data/--run are on a filesystem every node mounts (EFS, NFS)
    # model
    cell: str = "explicit"  # "explicit" (gates written out) or "fused" (torch.nn.LSTM / cuDNN)
    precision: str = ""  # "fp32" or "bf16" (autocast; weights, states, optimizer stay fp32); "": bf16 where the hardware has it
    embed: int = 64
    hidden: int = 384  # wider learns more per step than the extra cost per step loses, at 10 minutes (docs/results.md, "Width")
    layers: int = 1
    dropout: float = 0.25  # locked dropout between layers and before the head: a corpus this small is memorised
    embed_dropout: float = 0.1  # locked dropout on the embeddings
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights (AWD-LSTM), explicit cell only
    # optimisation; batch_size is per worker, in windows of seq_len characters
    batch_size: int = 8  # for a fixed budget on a CPU, more and smaller steps win (docs/results.md, "Updates per minute")
    carry_state: bool = True  # TBPTT over contiguous streams; False: shuffled windows from zero state
    lr: float = 2e-2  # high, for a short budget of small steps (docs/results.md, "bf16 and the learning rate")
    weight_decay: float = 0.1  # AdamW, decoupled; strong, as against memorising (docs/results.md, "weight decay")
    warmup_steps: int = 100
    lr_floor: float = 0.01  # the cosine ends at lr * lr_floor: the last steps take small steps to settle
    clip: float = 1.0
    max_steps: int = 100000
    max_minutes: float = 10.0  # > 0: stop (and finish the LR schedule) after this much wall time
    seed: int = 0
    # bookkeeping
    eval_every: int = 1000  # with its checkpoint, ~2 % of the wall time at the defaults (docs/results.md, "Where the step time goes")
    checkpoint_every: int = 0  # 0: with every evaluation
    keep: int = 3
    val_chars: int = 262144  # validation characters scored during training (evaluate scores all)
    log_every: int = 25
    max_failures: int = 2
    mlflow: str = ""  # an MLflow tracking URI: params, every metrics row and the final checkpoint go there too
    mlflow_experiment: str = "lstmgen"
    resume: bool = False
    preset: str = ""
    given: list[str] = field(default_factory=list)  # the fields set by a flag (not by a preset or a default)

    def __post_init__(self) -> None:
        checks = [
            (self.workers >= 1, f"--workers must be at least 1 (got {self.workers})"),
            (self.workers_max == 0 or self.workers_max >= self.workers,
             f"--workers MIN-MAX needs MAX >= MIN (got {self.workers}-{self.workers_max})"),
            (self.wait_timeout > 0, f"--wait-timeout must be positive (got {self.wait_timeout})"),
            (self.cell in ("explicit", "fused"), f"--cell must be explicit or fused (got {self.cell!r})"),
            (self.precision in ("", "fp32", "bf16"), f"--precision must be fp32 or bf16 (got {self.precision!r})"),
            (self.hidden >= 1 and self.embed >= 1 and self.layers >= 1, "--hidden/--embed/--layers must be >= 1"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1) (got {self.dropout})"),
            (0.0 <= self.embed_dropout < 1.0, f"--embed-dropout must be in [0, 1) (got {self.embed_dropout})"),
            (0.0 <= self.weight_drop < 1.0, f"--weight-drop must be in [0, 1) (got {self.weight_drop})"),
            (self.weight_drop == 0 or self.cell == "explicit", "--weight-drop needs --cell explicit (nn.LSTM's kernel drops no weights)"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})"),
            (self.eval_every >= 1, f"--eval-every must be at least 1 (got {self.eval_every})"),
            (self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be 0 (with each evaluation) or more (got {self.checkpoint_every})"),
            (self.clip > 0, f"--clip must be positive (got {self.clip})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {self.warmup_steps})"),
            (0.0 <= self.lr_floor <= 1.0, f"--lr-floor must be in [0, 1] (got {self.lr_floor})"),
            (self.max_minutes >= 0, f"--max-minutes must be >= 0 (got {self.max_minutes})"),
            (self.max_failures >= 0, f"--max-failures must be >= 0 (got {self.max_failures})"),
            (self.keep >= 1, f"--keep must be at least 1 (got {self.keep})"),
            (self.seed >= 0, f"--seed must be >= 0 (got {self.seed})"),
            (self.val_chars >= 0, f"--val-chars must be >= 0 (got {self.val_chars})"),
        ]
        _check(self, checks)

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_every

    @property
    def elastic(self) -> bool:
        return self.workers_max > self.workers


@dataclass
class TuneConfig:
    """A search: every trial trains with ``train`` (its data, budget, workers, model) except for
    the settings ``search`` draws."""

    run: str
    train: TrainConfig
    search: list[str] = field(default_factory=list)  # NAME=KIND:ARGS, e.g. lr=loguniform:3e-3:5e-2
    trials: int = 8
    max_concurrent: int = 2
    grace: float = 0.25  # no trial is stopped before this share of its budget
    reduction: int = 2  # at each rung of successive halving, 1 in this many trials goes on
    search_seed: int = 0
    baseline: bool = True  # the first trial trains the fixed config as given, for comparison
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        _check(self, [
            (self.trials >= 1, f"--trials must be at least 1 (got {self.trials})"),
            (self.max_concurrent >= 1, f"--max-concurrent must be at least 1 (got {self.max_concurrent})"),
            (0.0 < self.grace <= 1.0, f"--grace must be in (0, 1] (got {self.grace})"),
            (self.reduction >= 2, f"--reduction must be at least 2 (got {self.reduction})"),
            (self.search_seed >= 0, f"--search-seed must be >= 0 (got {self.search_seed})"),
        ])


def parse_workers(text: str) -> tuple[int, int]:
    """``--workers N`` (fixed) or ``--workers MIN-MAX`` (elastic) -> (workers, workers_max)."""
    low, dash, high = str(text).partition("-")
    try:
        return (int(low), int(high)) if dash else (int(low), 0)
    except ValueError:
        raise LstmgenError(f"--workers takes N or MIN-MAX, like 2 or 2-8 (got {text!r})") from None


# Named recipes: only what differs from the defaults above, which are themselves the recipe for
# 10 minutes on a 2-core CPU (so ``cpu-10min`` names them and changes nothing). Flags override a
# preset. Figures in docs/results.md.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden=128, embed=32, batch_size=16, max_steps=200, max_minutes=0.0, eval_every=50, warmup_steps=20),
    "cpu-10min": dict(),
    "best": dict(max_minutes=60.0),  # the defaults, trained longer: ahead of the old 2 x 512 recipe (docs/results.md, "60 minutes")
}


NOT_IN_A_CONFIG_FILE = ("data", "run", "resume", "given", "preset")  # flags of the command, not settings of a model


def settings_file(path: str, text: str) -> dict:
    """A ``--config`` file: a JSON object of TrainConfig settings (``lstmgen tune`` writes one as
    RUN/best.json), each of the field's type."""
    import json

    try:
        values = json.loads(text)
    except ValueError as exc:
        raise LstmgenError(f"{path}: not a JSON config ({exc})") from None
    if not isinstance(values, dict):
        raise LstmgenError(f"{path}: a config is a JSON object of settings")
    types = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in types or key in NOT_IN_A_CONFIG_FILE:
            raise LstmgenError(f"{path}: {key!r} is not a train setting" + (" a file can set" if key in types else ""))
        want = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}.get(str(types[key]), (object,))
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            raise LstmgenError(f"{path}: {key} must be {str(types[key])} (got {value!r})")
    return values


def train_config(preset: str = "", settings: dict | None = None, **flags) -> TrainConfig:
    """Preset values first, then a ``--config`` file's settings, then every flag the user actually
    gave (None means not given)."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise LstmgenError(f"unknown --preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(settings or {})
    values.update({k: v for k, v in flags.items() if v is not None})
    given = sorted(k for k, v in flags.items() if v is not None and k not in ("data", "run", "resume"))
    return TrainConfig(preset=preset, given=given, **values)


def default(job: type, name: str) -> str:
    """``[default: X]`` for a flag's help, read from the job's dataclass (the one place it is set)."""
    value = job.__dataclass_fields__[name].default
    return f"[default: {value}]"


@dataclass
class SampleConfig:
    """Sampling controls shared by streaming and batch generation."""

    length: int = 500
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    until_next_article: bool = False

    def __post_init__(self) -> None:
        _check(self, [
            (self.length >= 1, f"--length must be at least 1 (got {self.length})"),
            (self.temperature > 0, f"--temperature must be > 0 (got {self.temperature})"),
            (self.top_k >= 0, f"--top-k must be 0 (off) or a count of characters (got {self.top_k})"),
            (0.0 < self.top_p <= 1.0, f"--top-p must be in (0, 1] (got {self.top_p})"),
            (self.seed >= 0, f"--seed must be >= 0 (got {self.seed})"),
        ])


@dataclass
class GenerateConfig:
    checkpoint: str
    prime: str = "\n"
    primes_file: str = ""
    article: str = ""
    num_samples: int = 1
    out: str = ""
    format: str = ""  # jsonl or parquet; default from --out's extension
    batch_size: int = 64
    concurrency: int = 2
    gpu: bool = False
    overwrite: bool = False
    wait_timeout: float = 600.0  # seconds to wait for the cluster to offer the actors' resources
    shared_fs: bool = False  # a local --checkpoint is on a filesystem every node mounts
    sampling: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SampleConfig(**self.sampling)
        _check(self, [
            (self.num_samples >= 1, f"--num-samples must be at least 1 (got {self.num_samples})"),
            (self.batch_size >= 1 and self.concurrency >= 1, "--batch-size and --concurrency must be at least 1"),
            (not self.format or self.format in ("jsonl", "parquet"), f"--format must be jsonl or parquet (got {self.format!r})"),
            (self.wait_timeout > 0, f"--wait-timeout must be positive (got {self.wait_timeout})"),
        ])


@dataclass
class EvaluateConfig:
    checkpoint: str
    data: str
    split: str = "valid"
    rows: int = 16  # the split is cut into this many rows, scored side by side with state carried
    dynamic: bool = False  # dynamic evaluation: adapt to the text as it is scored
    segment: int = 50
    # in units of the gradient's RMS on training text; chosen on held-out text, the first half of a
    # 60-minute run's split (bench/dynamic.py; docs/results.md, "Dynamic evaluation's step scale")
    dynamic_lr: float = 1e-3
    dynamic_decay: float = 1e-3
    mix_counts: int = 0  # > 0: also mix with an adaptive count model of context orders 0..this (lstmgen.mixture)
    mix_lr: float = 0.4  # the mixture gate's online step size (chosen on the training tail by bench/quality.py)

    def __post_init__(self) -> None:
        checks = [
            (self.rows >= 1, f"--rows must be at least 1 (got {self.rows})"),
            (self.segment >= 1, f"--segment must be at least 1 (got {self.segment})"),
            (self.dynamic_lr >= 0 and self.dynamic_decay >= 0, "--dynamic-lr and --dynamic-decay must be >= 0"),
            (self.mix_counts >= 0, f"--mix-counts must be 0 (off) or a context order (got {self.mix_counts})"),
            (self.mix_lr >= 0, f"--mix-lr must be >= 0 (got {self.mix_lr})"),
        ]
        _check(self, checks)

