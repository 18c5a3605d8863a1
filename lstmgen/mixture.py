"""Mixing the LSTM with an adaptive count model of the text read so far (PPM-style).

A compressor such as PPMd wins on a small corpus because it remembers exact strings it has
seen: a name that occurred three paragraphs ago is cheap the second time. The LSTM generalises
but forgets such specifics. The count model here holds, for every context of the last 0..order
characters, how often each character followed it (training text first, then the held-out text
as it is scored), and blends the orders by Witten-Bell interpolation:

    p_k(x) = (c_k(x) + d_k * p_{k-1}(x)) / (n_k + d_k),   p_{-1} = 1 / V

(c: count of x after the order-k context, n: all counts there, d: distinct characters seen
there). The two predictions are mixed per character with Bayesian weights updated by how well
each predicted the character just read, with a fixed share so that the weights keep moving.
Only the probability of the character that actually comes is needed, so scoring is a scalar
recursion per character.
"""

from __future__ import annotations

import math

import numpy as np


class CountModel:
    def __init__(self, vocab_size: int, order: int = 5):
        self.vocab_size = vocab_size
        self.order = order
        self.tables: list[dict[bytes, dict[int, int]]] = [{} for _ in range(order + 1)]

    def _keys(self, ids: np.ndarray, t: int):
        for k in range(min(self.order, t) + 1):
            yield k, ids[t - k : t].tobytes()

    def prob(self, ids: np.ndarray, t: int) -> float:
        """P(ids[t] | ids[:t]) before ids[t] is counted."""
        x = int(ids[t])
        p = 1.0 / self.vocab_size
        for k, key in self._keys(ids, t):
            table = self.tables[k].get(key)
            if table:
                total, distinct = table[-1], len(table) - 1
                p = (table.get(x, 0) + distinct * p) / (total + distinct)
        return p

    def update(self, ids: np.ndarray, t: int) -> None:
        x = int(ids[t])
        for k, key in self._keys(ids, t):
            table = self.tables[k].setdefault(key, {-1: 0})
            table[x] = table.get(x, 0) + 1
            table[-1] += 1

    def fit(self, ids: np.ndarray) -> CountModel:
        ids = np.ascontiguousarray(ids, dtype=np.uint16)
        for t in range(len(ids)):
            self.update(ids, t)
        return self

    def bits(self, ids: np.ndarray) -> np.ndarray:
        """Bits for ids[1:], each scored before it is counted (adapting as it reads)."""
        ids = np.ascontiguousarray(ids, dtype=np.uint16)
        out = np.empty(len(ids) - 1)
        for t in range(1, len(ids)):
            out[t - 1] = -math.log2(self.prob(ids, t))
            self.update(ids, t)
        return out


def mix_bits(a: np.ndarray, b: np.ndarray, share: float = 0.02) -> np.ndarray:
    """Per-character bits of the Bayesian mixture of two predictors (given their bits on the same
    characters), with fixed-share weight updates."""
    w = np.array([0.5, 0.5])
    out = np.empty(len(a))
    pa, pb = np.exp2(-a), np.exp2(-b)
    for t in range(len(a)):
        p = w[0] * pa[t] + w[1] * pb[t]
        out[t] = -math.log2(p)
        w = np.array([w[0] * pa[t], w[1] * pb[t]]) / p
        w = (1 - share) * w + share / 2
    return out
