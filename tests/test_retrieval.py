"""BM25 retrieval: tokens, hand-computed scores, ranking rules, and agreement with bm25s."""

from __future__ import annotations

import math
import random

import pytest

from finemem.records import MemoryItem
from finemem.retrieval import BM25Index, bm25s_scores, rank, retrieve, tokenize


def item(i: int, content: str, step: int = 1) -> MemoryItem:
    return MemoryItem(id=f"m{i}", content=content, step=step)


def test_tokenize_lowercase_words():
    assert tokenize("Mira's locker-code: 4821. ÉCOLE!") == ["mira", "s", "locker", "code", "4821", "cole"]
    assert tokenize("") == []


def test_hand_computed_score():
    # N=2, avgdl=(3+1)/2=2; "code" occurs in one doc: idf = ln(1 + 1.5/1.5) = ln 2
    items = [item(1, "code code pie"), item(2, "tea")]
    tf, dl, avgdl, k1, b = 2, 3, 2.0, 1.5, 0.75
    expected = math.log(2) * tf / (tf + k1 * (1 - b + b * dl / avgdl))
    scores = BM25Index(items).scores(["code"])
    assert scores[0] == pytest.approx(expected, rel=1e-12)
    assert scores[1] == 0.0
    # a repeated query token counts twice (as in bm25s)
    assert BM25Index(items).scores(["code", "code"])[0] == pytest.approx(2 * expected)


def test_positive_scores_only_best_first_and_k():
    items = [item(1, "the cat sat"), item(2, "cat cat cat food"), item(3, "dogs bark")]
    hits = retrieve("cat food", items, k=5)
    assert [m.id for m, _ in hits] == ["m2", "m1"]
    assert all(s > 0 for _, s in hits)
    assert hits[0][1] > hits[1][1]
    assert [m.id for m, _ in retrieve("cat food", items, k=1)] == ["m2"]
    assert retrieve("zebra", items, k=3) == []
    assert retrieve("", items, k=3) == []
    assert retrieve("cat", [], k=3) == []
    assert retrieve("cat", items, k=0) == []


def test_ties_most_recent_step_then_id():
    items = [item(1, "blue car", 1), item(2, "blue car", 3), item(3, "blue car", 3), item(4, "red bike", 4)]
    hits = retrieve("blue", items, k=3)
    assert [m.id for m, _ in hits] == ["m2", "m3", "m1"]
    assert len({s for _, s in hits}) == 1


def test_rank_rejects_negative_k_and_unknown_backend():
    with pytest.raises(ValueError, match="k must be"):
        rank([], [], -1)
    with pytest.raises(ValueError, match="unknown retrieval backend"):
        retrieve("x", [], 1, backend="faiss")


def _random_memory(rng: random.Random) -> tuple[list[MemoryItem], list[str]]:
    vocab = [f"w{i}" for i in range(rng.randint(3, 40))]
    return [
        MemoryItem(f"m{i}", " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12))), rng.randint(1, 6))
        for i in range(rng.randint(1, 25))
    ], vocab


def test_pure_python_agrees_with_bm25s_on_random_memories():
    rng = random.Random(7)
    compared = 0
    for _ in range(200):
        items, vocab = _random_memory(rng)
        query = " ".join(rng.choice(vocab + ["absent"]) for _ in range(rng.randint(1, 6)))
        ours = BM25Index(items).scores(tokenize(query))
        ref = bm25s_scores(items, query)
        assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6)
        # same ranking wherever the scores are not float32-close ties
        a = retrieve(query, items, 3, backend="python")
        b = retrieve(query, items, 3, backend="bm25s")
        if all(abs(x - y) > 1e-4 or x == y for x in ours for y in ours):
            assert [m.id for m, _ in a] == [m.id for m, _ in b]
            compared += 1
    assert compared > 50
