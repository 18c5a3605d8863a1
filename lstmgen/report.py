"""What a run did: its metrics curve as a PNG in the run directory, and a short summary."""

from __future__ import annotations

import io
import json

from lstmgen import checkpoint, storage
from lstmgen.errors import LstmgenError

ROW_NUMBERS = ("step", "train_bpc", "val_bpc", "elapsed_s", "chars_per_s")  # what the report and the plot read from every row


def read_metrics(run: str) -> list[dict]:
    path = storage.join(run, "metrics.jsonl")
    if not storage.exists(path):
        raise LstmgenError(f"{run}: no metrics.jsonl (not a run directory, or no evaluation yet)")
    rows = []
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
            if row is not None and not (isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in ROW_NUMBERS)):
                raise ValueError(f"a row needs the numbers {', '.join(ROW_NUMBERS)}")
        except ValueError as exc:
            raise LstmgenError(f"{path}:{n}: not a metrics row ({exc})") from None
        rows += [row] if row is not None else []
    if not rows:
        raise LstmgenError(f"{path}: no metrics rows")
    return rows


def short_rows(history: list[dict]) -> list[dict]:
    """Rows whose training bpc is the mean of only a few steps (under a quarter of the most any
    row has; e.g. the last row when the budget ended just after an evaluation): plotted apart, as
    their mean is far noisier than the rest."""
    most = max((r.get("train_steps", 0) for r in history), default=0)
    return [r for r in history if "train_steps" in r and r["train_steps"] < most / 4]


def plot(history: list[dict], run: str) -> str:
    """Training and validation bits per character against step -> RUN/loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    short = short_rows(history)
    full = [r for r in history if r not in short]
    (line,) = ax.plot([r["step"] for r in full], [r["train_bpc"] for r in full], label="train", marker=".")
    if short:
        ax.plot([r["step"] for r in short], [r["train_bpc"] for r in short], linestyle="none", marker="o",
                markerfacecolor="none", color=line.get_color(), label="train, mean of a few steps")
    if any("val_bpc" in r for r in history):
        ax.plot([r["step"] for r in history], [r.get("val_bpc") for r in history], label="validation", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title(run.rstrip("/").split("/")[-1])
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    path = storage.join(run, "loss.png")
    storage.write_bytes(path, buf.getvalue())
    return path


def summary(run: str) -> str:
    history = read_metrics(run)
    png = plot(history, run)
    last = history[-1]
    best_row = min(history, key=lambda r: r.get("val_bpc", float("inf")))
    chosen = checkpoint.first_intact(checkpoint.ranked(checkpoint.list_checkpoints(run)))  # what --checkpoint RUN loads
    lines = [
        f"run          {run}",
        f"steps        {last['step']}  ({last['elapsed_s'] / 60:.1f} min, {last['chars_per_s'] / 1e3:.1f}k chars/s at the end)",
        f"train bpc    {last['train_bpc']:.3f} (last evaluation"
        + (f", the mean of only {last['train_steps']} steps)" if last in short_rows(history) else ")"),
        f"valid bpc    {last.get('val_bpc', float('nan')):.3f} last, "
        f"{best_row.get('val_bpc', float('nan')):.3f} best at step {best_row['step']}",
        f"checkpoint   {chosen.path if chosen else '(none)'}",
        f"plot         {png}",
    ]
    from lstmgen.tracking import events_dir

    if storage.exists(events_dir(run)):
        lines.append(f"tensorboard  tensorboard --logdir {events_dir(run)}")
    return "\n".join(lines)
