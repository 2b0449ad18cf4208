"""BM25 retrieval over memory items: what the reasoning agent sees for a question.

Tokens are lowercase word tokens: the text is lowercased and split by the regular expression
`[a-z0-9]+`, so punctuation and any non-ASCII characters separate words and are dropped
("Mira's code: 4821." -> ["mira", "s", "code", "4821"]). No stemming, no stop words.

Scoring is BM25 in the Lucene variant with k1=1.5, b=0.75 (the `bm25s` defaults):
`score(d, q) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))`,
`idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))`; a query token repeated counts again.

Two implementations compute the same numbers:
- `BM25Index` (pure Python, the default): the memories here are tens of items and retrieval runs
  for every chunk question of every step, so the index build dominates. Measured on the 2-core
  dev machine (shared, so +-50%), 20 items x ~10 tokens, 8-token query: bm25s 1.1-1.9 ms per
  build+query; this class 0.1-0.4 ms per build+query and ~16 us per extra query on a built
  index (the scorer builds one index per step snapshot and asks it all K chunk questions).
- `bm25s_scores` (the `bm25s` library) is the reference the tests compare against, and
  `retrieve(..., backend="bm25s")` uses it end to end.

Ranking keeps only items with a positive score (an item sharing no token with the query is never
evidence), best first; ties are broken by the most recent step, then by id, so a ranking is
deterministic.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from finemem.records import MemoryItem

TOKEN_RE = re.compile(r"[a-z0-9]+")
K1 = 1.5
B = 0.75
BACKENDS = ("python", "bm25s")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens: `re.findall("[a-z0-9]+", text.lower())`."""
    return TOKEN_RE.findall(text.lower())


class BM25Index:
    """A BM25 (Lucene variant) index over a fixed list of items; build once, query many times."""

    def __init__(self, items: Sequence[MemoryItem], k1: float = K1, b: float = B) -> None:
        self.items = list(items)
        self.k1 = k1
        self.b = b
        self._tfs = [Counter(tokenize(it.content)) for it in self.items]
        self._lengths = [sum(tf.values()) for tf in self._tfs]
        n = len(self.items)
        total = sum(self._lengths)
        self._avgdl = total / n if n else 0.0
        df: Counter[str] = Counter()
        for tf in self._tfs:
            df.update(tf.keys())
        self._idf = {t: math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
        # per-document length normalisation k1 * (1 - b + b * |d| / avgdl), computed once
        self._norm = [
            k1 * (1.0 - b + b * length / self._avgdl) if self._avgdl > 0 else k1 for length in self._lengths
        ]

    def scores(self, query_tokens: Sequence[str]) -> list[float]:
        """BM25 score of every item for the tokenized query (0.0 for items sharing no token)."""
        out = [0.0] * len(self.items)
        for tok in query_tokens:
            idf = self._idf.get(tok)
            if idf is None:
                continue
            for i, tf in enumerate(self._tfs):
                f = tf.get(tok)
                if f:
                    out[i] += idf * f / (f + self._norm[i])
        return out

    def search(self, query: str, k: int) -> list[tuple[MemoryItem, float]]:
        """The top-k items for `query` with positive score, best first (see `rank`)."""
        return rank(self.items, self.scores(tokenize(query)), k)


def bm25s_scores(items: Sequence[MemoryItem], query: str, k1: float = K1, b: float = B) -> list[float]:
    """Reference scores from the `bm25s` library (method "lucene"), built from pre-tokenized input."""
    import bm25s  # only when asked for: the default path is pure Python

    if not items:
        return []
    q = tokenize(query)
    docs = [tokenize(it.content) for it in items]
    if not q or not any(docs):
        return [0.0] * len(items)
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(docs, show_progress=False)
    ids = retriever.get_tokens_ids(q)
    if not ids:
        return [0.0] * len(items)
    return [float(s) for s in retriever.get_scores_from_ids(ids)]


def rank(items: Sequence[MemoryItem], scores: Sequence[float], k: int) -> list[tuple[MemoryItem, float]]:
    """Keep positive scores, sort by (score desc, step desc, id asc), cut to k."""
    if k < 0:
        raise ValueError(f"retrieval k must be >= 0, got {k}")
    pairs = [(it, float(s)) for it, s in zip(items, scores) if s > 0.0]
    pairs.sort(key=lambda p: (-p[1], -p[0].step, p[0].id))
    return pairs[:k]


def retrieve(
    query: str, items: Sequence[MemoryItem], k: int, backend: str = "python"
) -> list[tuple[MemoryItem, float]]:
    """The top-k memory items for `query` (positive BM25 scores only; may be empty)."""
    if backend == "python":
        return BM25Index(items).search(query, k)
    if backend == "bm25s":
        return rank(items, bm25s_scores(items, query), k)
    raise ValueError(f"unknown retrieval backend {backend!r} (choose one of: {', '.join(BACKENDS)})")
