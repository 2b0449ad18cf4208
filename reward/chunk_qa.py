"""Offline chunk-level QA generation: `finemem data chunk-qa --in PATH --out PATH [key=value ...]`.

For every chunk (from that chunk alone): a generator LLM proposes factoid question-answer pairs;
a pair is kept only if it is well formed, not a duplicate (normalised question), and a verifier
LLM answers it correctly from the chunk alone (`chunk_qa.verify_metric`, default substring exact
match against the proposed answer). The first K = `data.chunk_qa_per_chunk` kept pairs are
stored; while fewer survive, the generator is asked again (at most `chunk_qa.max_rounds` calls).

Resumable: every finished chunk is appended to a jsonl cache keyed by the SHA-256 of the chunk
text (`chunk_qa.cache_path`; later lines win), so a rerun asks only for chunks not yet done.
Failures (an endpoint that still fails after its retries) are recorded per chunk, not fatal:
the chunk keeps its previous chunk QA in the output, the summary counts it, the exit code is 1,
and a rerun retries it. Both endpoints are OpenAI-compatible (`chunk_qa.generator`,
`chunk_qa.verifier`; they may be the same server).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finemem.records import Instance, MemoryItem, QAPair
from finemem.scoring import normalize_answer, score_answer
from reward.answerers import AnswererError, OpenAIChatAnswerer

GENERATOR_SYSTEM = (
    "You write factoid question-answer pairs about a text chunk. Every question must be answerable "
    "from the chunk alone, ask about one specific fact, and have a short answer (a name, number, "
    "word or short phrase) copied from the chunk. Reply with a JSON list of objects "
    '[{"question": "...", "answer": "..."}] and nothing else.'
)


def generator_messages(chunk: str, n: int, avoid: list[str]) -> list[dict[str, str]]:
    """The generator prompt: up to `n` new pairs for `chunk`, none repeating `avoid`."""
    user = f"Chunk:\n{chunk}\n\nWrite up to {n} question-answer pairs."
    if avoid:
        user += "\nDo not repeat these questions:\n" + "\n".join(f"- {q}" for q in avoid)
    return [{"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": user}]


def chunk_key(chunk: str) -> str:
    """The cache key of a chunk: SHA-256 of its UTF-8 text (hex)."""
    return hashlib.sha256(chunk.encode("utf-8")).hexdigest()


class MalformedProposals(ValueError):
    """The generator's reply holds no JSON list of pairs."""


def parse_proposals(text: str) -> list[Any]:
    """The JSON list in a generator reply (code fences and text around the list are tolerated)."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        raise MalformedProposals(f"no JSON list in the reply: {text[:120]!r}")
    try:
        data = json.loads(text[start : end + 1])
    except ValueError as e:
        raise MalformedProposals(f"invalid JSON list ({e}): {text[start : start + 120]!r}") from None
    if not isinstance(data, list):
        raise MalformedProposals("the reply's JSON is not a list")
    return data


def _pair_of(obj: Any) -> QAPair | None:
    """A well-formed proposal as a QAPair, else None."""
    if not isinstance(obj, dict):
        return None
    q, a = obj.get("question"), obj.get("answer")
    if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
        return None
    return QAPair(question=q.strip(), answers=[a.strip()])


@dataclass
class ChunkResult:
    """The outcome for one chunk, as stored in the cache (one JSON line)."""

    key: str
    status: str  # ok | failed
    qa: list[dict[str, Any]] = field(default_factory=list)
    proposals: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rejection reason -> count
    error: str | None = None

    @property
    def pairs(self) -> list[QAPair]:
        return [QAPair.from_dict(d) for d in self.qa]


class ChunkQACache:
    """Append-only jsonl of ChunkResult; loading keeps the last line of each key."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results: dict[str, ChunkResult] = {}
        if self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                        self.results[obj["key"]] = ChunkResult(**obj)
                    except (ValueError, KeyError, TypeError) as e:
                        # a line cut by a crash is skipped; the chunk is redone
                        print(
                            f"chunk-qa: {self.path}: line {lineno}: unreadable cache entry ({e}), ignored",
                            file=sys.stderr,
                        )

    def done(self, key: str) -> bool:
        r = self.results.get(key)
        return r is not None and r.status == "ok"

    def append(self, result: ChunkResult) -> None:
        self.results[result.key] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result)) + "\n")
            f.flush()


class ChunkQAGenerator:
    """Propose, filter and verify chunk QA with two OpenAI-compatible endpoints."""

    def __init__(
        self,
        generator: Any,
        verifier: Any,
        k: int,
        max_proposals: int,
        max_rounds: int,
        verify_metric: str = "substring_exact_match",
    ) -> None:
        if k < 1 or max_proposals < 1 or max_rounds < 1:
            raise ValueError(
                f"chunk-qa: K ({k}), max_proposals ({max_proposals}) and max_rounds ({max_rounds}) "
                "must be >= 1"
            )
        self.generator = generator
        self.verifier = verifier
        self.k = k
        self.max_proposals = max_proposals
        self.max_rounds = max_rounds
        self.verify_metric = verify_metric

    async def _verified(self, chunk: str, pair: QAPair) -> bool:
        evidence = [MemoryItem(id="chunk", content=chunk, step=1)]
        pred = await self.verifier.answer(pair.question, evidence)
        return score_answer(pred, pair.answers, "synthetic", metric=self.verify_metric) >= 1.0

    async def run(self, chunk: str) -> ChunkResult:
        """One chunk, start to end; endpoint failures give a `failed` result (never raise)."""
        key = chunk_key(chunk)
        reasons: Counter[str] = Counter()
        kept: list[QAPair] = []
        seen: set[str] = set()
        proposals = 0
        try:
            for _ in range(self.max_rounds):
                if len(kept) >= self.k:
                    break
                reply = await self.generator.chat(
                    generator_messages(chunk, self.max_proposals, [p.question for p in kept])
                )
                try:
                    raw = parse_proposals(reply)
                except MalformedProposals:
                    reasons["malformed_output"] += 1
                    continue
                candidates: list[QAPair] = []
                for obj in raw:
                    proposals += 1
                    pair = _pair_of(obj)
                    if pair is None:
                        reasons["bad_fields"] += 1
                        continue
                    norm = normalize_answer(pair.question)
                    if norm in seen:
                        reasons["duplicate"] += 1
                        continue
                    seen.add(norm)
                    candidates.append(pair)
                verdicts = await asyncio.gather(*(self._verified(chunk, p) for p in candidates))
                for pair, ok in zip(candidates, verdicts):
                    if not ok:
                        reasons["verifier_wrong"] += 1
                    elif len(kept) < self.k:
                        kept.append(pair)
                    else:
                        reasons["over_k"] += 1
        except AnswererError as e:
            return ChunkResult(
                key=key, status="failed", proposals=proposals, reasons=dict(reasons), error=str(e)
            )
        return ChunkResult(
            key=key, status="ok", qa=[p.to_dict() for p in kept], proposals=proposals, reasons=dict(reasons)
        )


@dataclass
class ChunkQASummary:
    k: int = 5  # pairs wanted per chunk
    chunks: int = 0  # unique chunks in the input
    from_cache: int = 0
    generated: int = 0
    failed: int = 0
    kept_histogram: dict[int, int] = field(default_factory=dict)  # pairs kept -> chunks
    proposals: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the first few failure messages

    def text(self) -> str:
        ok = sum(self.kept_histogram.values())
        mean = sum(k * n for k, n in self.kept_histogram.items()) / ok if ok else 0.0
        short = sum(n for kept, n in self.kept_histogram.items() if kept < self.k)
        lines = [
            (
                f"chunk-qa: {self.chunks} unique chunks: {self.from_cache} from cache, "
                f"{self.generated} generated, {self.failed} failed"
            ),
            f"  kept per chunk: mean {mean:.2f}; histogram {dict(sorted(self.kept_histogram.items()))}; "
            + f"{short} chunks with fewer than K={self.k}",
            f"  proposals this run: {self.proposals}; rejections: {dict(sorted(self.rejections.items()))}",
        ]
        lines += [f"  failure: {e}" for e in self.errors]
        return "\n".join(lines)


async def generate_for_instances(
    instances: list[Instance],
    gen: ChunkQAGenerator,
    cache: ChunkQACache,
    concurrency: int = 8,
    progress: bool = True,
) -> tuple[list[Instance], ChunkQASummary]:
    """Fill `chunk_qa` of every instance (chunks not done are generated, the rest read from the cache)."""
    from tqdm import tqdm

    keys = {chunk_key(c): c for inst in instances for c in inst.chunks}
    summary = ChunkQASummary(k=gen.k, chunks=len(keys))
    todo = [(k, c) for k, c in keys.items() if not cache.done(k)]
    summary.from_cache = len(keys) - len(todo)
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(
        total=len(keys),
        initial=summary.from_cache,
        desc="chunk-qa",
        unit="chunk",
        file=sys.stderr,
        disable=not progress,
    )

    async def one(key: str, chunk: str) -> ChunkResult:
        async with sem:
            result = await gen.run(chunk)
        cache.append(result)
        bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(k, c) for k, c in todo))
    finally:
        bar.close()
    rejections: Counter[str] = Counter()
    for r in results:
        summary.proposals += r.proposals
        rejections.update(r.reasons)
        if r.status == "ok":
            summary.generated += 1
        else:
            summary.failed += 1
            if len(summary.errors) < 5:
                summary.errors.append(r.error or "unknown error")
    summary.rejections = dict(rejections)
    hist: Counter[int] = Counter()
    for k in keys:
        if cache.done(k):
            hist[len(cache.results[k].qa)] += 1
    summary.kept_histogram = dict(hist)

    out = []
    for inst in instances:
        new = Instance.from_dict(inst.to_dict())
        new.chunk_qa = [
            cache.results[chunk_key(c)].pairs if cache.done(chunk_key(c)) else list(old)
            for c, old in zip(inst.chunks, inst.chunk_qa)
        ]
        out.append(new)
    return out, summary


def cli(argv: list[str]) -> int:
    """`finemem data chunk-qa --in PATH --out PATH [key=value ...]`: generate and verify chunk QA.
    Exit 0 when every chunk is done, 1 when some failed (rerun to retry them; done chunks are cached)."""
    from finemem.cli import parse_command
    from finemem.config import load_config
    from finemem.data.readers import load_instances, write_jsonl

    parser = argparse.ArgumentParser(prog="finemem data chunk-qa", description=cli.__doc__)
    parser.add_argument("--in", dest="inp", required=True, help="instances: jsonl, Memalpha or MAB parquet")
    parser.add_argument("--out", required=True, help="output jsonl with chunk_qa filled in")
    parser.add_argument("--format", default="auto", help="input format: auto | jsonl | memalpha | mab")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parse_command(parser, argv)
    cfg = load_config(overrides)
    qcfg = cfg.chunk_qa
    instances = load_instances(
        args.inp,
        fmt=args.format,
        chunk_tokens=int(cfg.data.chunk_tokens),
        skip_bad_rows=bool(cfg.data.skip_bad_rows),
    )
    generator = OpenAIChatAnswerer(qcfg.generator)
    verifier = OpenAIChatAnswerer(qcfg.verifier)
    gen = ChunkQAGenerator(
        generator,
        verifier,
        k=int(cfg.data.chunk_qa_per_chunk),
        max_proposals=int(qcfg.max_proposals),
        max_rounds=int(qcfg.max_rounds),
        verify_metric=str(qcfg.verify_metric),
    )
    cache = ChunkQACache(qcfg.cache_path)

    async def run():
        try:
            return await generate_for_instances(
                instances, gen, cache, int(qcfg.concurrency), progress=not args.no_progress
            )
        finally:
            await generator.close()
            await verifier.close()

    out, summary = asyncio.run(run())
    write_jsonl(out, args.out)
    print(summary.text())
    print(f"  wrote {len(out)} instances to {args.out}; cache {cache.path}")
    print(f"  generator: {json.dumps(generator.metrics())}")
    print(f"  verifier: {json.dumps(verifier.metrics())}")
    return 1 if summary.failed else 0
