"""Choosing the next character from the model's logits: temperature, top-k, top-p, greedy.

Randomness is counter-based: the uniform number for row r at step t is a hash of (the row's
seed, t). A row's text therefore depends only on its own seed and the model, never on which
other rows share its batch or how many actors run, and re-running one seed reproduces its text
exactly. Draws use the inverse CDF of the filtered distribution in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lstmgen.config import SampleConfig

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised (uint64 arithmetic wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        z = (x + _GOLDEN) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return z ^ (z >> np.uint64(31))


def derive_seed(seed: int, *keys: int) -> int:
    """A per-sample seed from the job seed and (prime index, sample index); fits in int63."""
    z = np.array([seed], dtype=np.uint64)
    for k in keys:
        z = splitmix64(z ^ np.uint64(k & 0xFFFFFFFFFFFFFFFF))
    return int(z[0] >> np.uint64(1))


def uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """One U[0, 1) per row for this step."""
    with np.errstate(over="ignore"):
        z = splitmix64(splitmix64(seeds.astype(np.uint64)) ^ (np.uint64(step) * _GOLDEN & _MASK))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def probabilities(logits: Tensor, cfg: SampleConfig) -> Tensor:
    """Filtered, renormalised next-character distribution (batch, vocab), float64."""
    logits = logits.double() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly more likely ones
        keep_sorted = before < cfg.top_p  # always keeps the most likely character
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(logits: Tensor, cfg: SampleConfig, seeds: np.ndarray, step: int) -> Tensor:
    """logits (batch, vocab) -> next ids (batch,)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, cfg)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.from_numpy(uniforms(seeds, step)).to(cdf.device)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True)[:, 0]
    return ids.clamp_(max=logits.shape[-1] - 1)
