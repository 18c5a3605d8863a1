"""Batch generation on a Ray Data actor pool, sampling reproducibility, and article stopping."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from lstmgen import checkpoint
from lstmgen.config import GenerateConfig, SampleConfig
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.generate import _stopped, generate_batch, generate_job, load_for_generation
from lstmgen.model import CharLSTM, ModelConfig
from lstmgen.sample import derive_seed

from .conftest import wiki_text


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small model fitted for a few steps on WikiText text, saved as a real checkpoint."""
    text = wiki_text(30_000)
    vocab = Vocab.from_codepoints([ord(c) for c in text])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(vocab), embed=16, hidden=64, layers=2, dropout=0.0, embed_dropout=0.0)
    model = CharLSTM(cfg)
    ids = torch.tensor(vocab.encode(text))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s : s + 65] for s in starts])
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_0000030"
    from dataclasses import asdict

    checkpoint.save(str(path), {"model": model.state_dict(), "optimizer": {}, "step": 30, "elapsed": 0.0},
                    {"step": 30, "metrics": {"val_bpc": 3.0}, "model": asdict(cfg), "vocab": vocab.tokens, "train": {}})
    return str(path)


def test_batch_job_primes_times_samples_on_two_actors(ray_local, tiny_checkpoint, tmp_path):
    (tmp_path / "primes.txt").write_text("The \nIn 1990 , the\n = Valkyria = \\n\n")
    out = tmp_path / "gen.jsonl"
    cfg = GenerateConfig(checkpoint=tiny_checkpoint, primes_file=str(tmp_path / "primes.txt"), num_samples=4,
                         out=str(out), batch_size=5, concurrency=2, sampling=SampleConfig(length=40, seed=11))
    result = generate_job(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["samples"] == len(rows) == 12
    assert [(r["prime_index"], r["sample"]) for r in rows] == [(p, s) for p in range(3) for s in range(4)]
    assert [r["prime"] for r in rows[::4]] == ["The ", "In 1990 , the", " = Valkyria = \n"]
    vocab = load_for_generation(tiny_checkpoint)[1]
    for r in rows:
        assert 1 <= r["chars"] == len(r["text"]) <= 40 and not vocab.unknown(r["text"])
        assert r["seed"] == derive_seed(11, r["prime_index"], r["sample"]) and r["stop_reason"] == "length"
        assert r["nll_per_char"] > 0
    assert len({r["seed"] for r in rows}) == 12

    # Re-running one sample with its written seed reproduces its text exactly, outside the job.
    model, vocab, _ = load_for_generation(tiny_checkpoint)
    again = generate_batch(model, vocab, [rows[5]["prime"]], [rows[5]["seed"]], SampleConfig(length=40))
    assert again[0]["text"] == rows[5]["text"]

    # Refuses to clobber; Parquet output has the same rows.
    with pytest.raises(LstmgenError, match="--overwrite"):
        generate_job(cfg)
    cfg.out, cfg.format = str(tmp_path / "gen.parquet"), ""
    generate_job(cfg)
    table = pq.read_table(tmp_path / "gen.parquet")
    assert table.column("text").to_pylist() == [r["text"] for r in rows]


def test_batched_rows_equal_one_at_a_time(tiny_checkpoint):
    model, vocab, _ = load_for_generation(tiny_checkpoint)
    primes = ["The ", "In the year of", "A", "The ", " = = History = = \n"]
    seeds = [derive_seed(5, i) for i in range(len(primes))]
    cfg = SampleConfig(length=60, temperature=1.0, top_p=0.95)
    together = generate_batch(model, vocab, primes, seeds, cfg)
    alone = [generate_batch(model, vocab, [p], [s], cfg)[0] for p, s in zip(primes, seeds)]
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert together[0]["text"] != together[3]["text"]  # same prime, different seed


def test_stop_strings_end_a_row_early(tiny_checkpoint):
    model, vocab, _ = load_for_generation(tiny_checkpoint)
    free = generate_batch(model, vocab, ["The "], [1], SampleConfig(length=200))[0]["text"]
    stop = free[20:22]
    cut = generate_batch(model, vocab, ["The "], [1], SampleConfig(length=200, stop=[stop]))[0]
    assert cut["stop_reason"] == "stop" and free.startswith(cut["text"]) and stop not in cut["text"]


def test_until_next_article_stops_at_a_top_level_heading_only():
    cfg = SampleConfig(until_next_article=True)
    article = (" Valkyria is a game .\n = = Gameplay = = \n It plays well .\n = = = Story = = = \n"
               " More text .\n = Next Article = \n Never reached")
    text, stopped = "", None
    for ch in article:
        text += ch
        stopped = _stopped(text, cfg)
        if stopped:
            break
    assert stopped is not None
    kept, reason = stopped
    assert reason == "next_article"
    assert kept.endswith(" More text .\n") and "= = Gameplay = =" in kept and "Next Article" not in kept


def test_bad_generation_config_and_primes(ray_local, tiny_checkpoint, tmp_path):
    for bad in (dict(temperature=0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(length=0)):
        with pytest.raises(LstmgenError):
            SampleConfig(**bad)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LstmgenError, match="no primes"):
        generate_job(GenerateConfig(checkpoint=tiny_checkpoint, primes_file=str(tmp_path / "empty.txt"),
                                    out=str(tmp_path / "o.jsonl")))
    (tmp_path / "odd.txt").write_text("fine\nsnow ☃\n")
    with pytest.raises(LstmgenError, match="☃"):
        generate_job(GenerateConfig(checkpoint=tiny_checkpoint, primes_file=str(tmp_path / "odd.txt"),
                                    out=str(tmp_path / "o.jsonl")))
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(LstmgenError, match=r"generate asks for 2 x \{CPU: 1, GPU: 1\}.*no GPU anywhere"):
        generate_job(GenerateConfig(checkpoint=tiny_checkpoint, num_samples=2, out=str(tmp_path / "o.jsonl"), gpu=True))
    assert not (tmp_path / "o.jsonl").exists()
