"""Mixing the LSTM with an adaptive count model of the text read so far (PPM-style).

A compressor such as PPMd wins on a small corpus because it remembers exact strings it has
seen: a name that occurred three paragraphs ago is cheap the second time. The LSTM generalises
but forgets such specifics. The count model here holds, for every context of the last 0..K
characters, how often each character followed it (training text first, then the held-out text
as it is scored), and turns each order into a prediction by Witten-Bell interpolation with the
orders below it:

    p_k(x) = (c_k(x) + d_k * p_{k-1}(x)) / (n_k + d_k),   p_{-1} = 1 / V

(c: count of x after the order-k context, n: all counts there, d: distinct characters seen
there). No single order is best everywhere: a long context seen twice is worth more than a
short one seen a thousand times only when it is deterministic. So a gate picks the blend: the
weights over the orders (and, when mixing, the LSTM) are a softmax of logits chosen by the
context's class (longest order seen, how often, whether only one character ever followed it).
The logits are fitted on the training text, where every position is predicted from the text
before it, then keep learning online as the scored text is read (each character scored before
the update), as a compressor's model does.

Only the probability of the character that actually comes is needed from each expert, and a
mixture of distributions is a distribution, so scoring never normalises over the vocabulary.
The counts are computed for all positions at once with sorts (numpy), not a dictionary per
character.
"""

from __future__ import annotations

import numpy as np
import torch

N_BUCKETS = (1, 2, 3, 5, 9, 17, 33)  # bucket edges of the context's count at its longest order


def _rank_in_group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each position, how many earlier positions share its key; plus the stable sort order
    and the group starts in sorted order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    start = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    index = np.arange(len(keys))
    group_first = np.maximum.accumulate(np.where(start, index, 0))
    rank = np.empty(len(keys), np.int64)
    rank[order] = index - group_first
    return rank, order, group_first


def context_counts(ids: np.ndarray, k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c, n, d) of every position's order-k context, counted over the positions before it."""
    ids64 = ids.astype(np.uint64)
    key = np.zeros(len(ids), np.uint64)
    for j in range(1, k + 1):  # the context as a number in base V + 1 (wraps past 2^64: a hash)
        previous = np.zeros(len(ids), np.uint64)
        previous[j:] = ids64[:-j] + np.uint64(1)
        key = key * np.uint64(vocab_size + 1) + previous
    n, order, group_first = _rank_in_group(key)
    c, _, _ = _rank_in_group(key * np.uint64(vocab_size + 7) + ids64 * np.uint64(0x9E3779B97F4A7C15))
    new_char = (c == 0).astype(np.int64)[order]  # first time this character follows this context
    seen_before = np.cumsum(new_char) - new_char
    d = np.empty(len(ids), np.int64)
    d[order] = seen_before - seen_before[group_first]
    return c, n, d


def count_experts(ids: np.ndarray, vocab_size: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the probability of the character there under p_{-1}..p_K (N, K + 2), and
    the gate class of its context."""
    p = np.full(len(ids), 1.0 / vocab_size)
    experts, counts, distinct = [p], [], []
    for k in range(order + 1):
        c, n, d = context_counts(ids, k, vocab_size)
        p = np.where(n > 0, (c + d * p) / np.maximum(n + d, 1), p)
        experts.append(p)
        counts.append(n)
        distinct.append(d)
    n, d = np.stack(counts, 1), np.stack(distinct, 1)
    rows = np.arange(len(ids))
    longest = (n > 0).sum(1) - 1
    bucket = np.digitize(n[rows, longest], N_BUCKETS)
    deterministic = d[rows, longest] == 1
    classes = (longest * (len(N_BUCKETS) + 1) + bucket) * 2 + deterministic
    return np.stack(experts, 1), classes


def n_classes(order: int) -> int:
    return (order + 1) * (len(N_BUCKETS) + 1) * 2


def fit_gate(experts: np.ndarray, classes: np.ndarray, order: int, iters: int = 100) -> np.ndarray:
    """Gate logits (classes x experts) minimising bits on these positions (training text)."""
    q = torch.from_numpy(experts.astype(np.float32))
    cls = torch.from_numpy(classes)
    logits = torch.zeros(n_classes(order), experts.shape[1], requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(iters):
        p = (torch.softmax(logits[cls], 1) * q).sum(1)
        loss = -torch.log(p).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits.detach().double().numpy()


def online_bits(logits: np.ndarray, experts: np.ndarray, classes: np.ndarray, lr: float) -> np.ndarray:
    """Bits of the gated mixture, each character scored before the gate takes one gradient step
    on it (the gradient of -ln p with respect to the class's logits is w - w * q / p)."""
    logits = logits.copy()
    out = np.empty(len(experts))
    for t in range(len(experts)):
        row = logits[classes[t]]
        w = np.exp(row - row.max())
        w /= w.sum()
        wq = w * experts[t]
        p = wq.sum()
        out[t] = p
        row -= lr * (w - wq / p)
    return -np.log2(out)


class Mixture:
    """The count model's experts and gate for ``ids`` scored after ``train_ids``. Bits are for
    ids[1:], the characters the LSTM scores (each predicted from all the text before it)."""

    def __init__(self, train_ids: np.ndarray, ids: np.ndarray, vocab_size: int, order: int = 10):
        stream = np.concatenate([train_ids, ids]).astype(np.int64)
        experts, classes = count_experts(stream, vocab_size, order)
        start = len(train_ids)
        fit_from = min(start // 20, 50_000)  # the first positions have almost no counts behind them
        self.logits = fit_gate(experts[fit_from:start], classes[fit_from:start], order)
        self.experts, self.classes = experts[start + 1 :], classes[start + 1 :]

    def count_bits(self, lr: float = 0.4) -> np.ndarray:
        """The count model alone (gate fitted on the training text, then learning online)."""
        return online_bits(self.logits, self.experts, self.classes, lr)

    def mixed_bits(self, lstm_bits: np.ndarray, lr: float = 0.4) -> np.ndarray:
        """The LSTM (its bits on the same characters) as one more expert under the same gate. In
        every class it starts with half the weight (its logit is the log-sum-exp of the count
        model's), so the gate need not first learn to trust it: the count logits were fitted
        without it and are large (their log-sum-exp is 3.5 on average on WikiText-2), and a logit
        of 0 would start it near 3 % of the weight."""
        experts = np.concatenate([self.experts, np.exp2(-lstm_bits)[:, None]], 1)
        half = np.logaddexp.reduce(self.logits, axis=1, keepdims=True)
        logits = np.concatenate([self.logits, half], 1)
        return online_bits(logits, experts, self.classes, lr)
