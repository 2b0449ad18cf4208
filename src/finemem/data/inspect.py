"""`finemem data inspect PATH`: what a data file holds, before anyone trains on it.

Counts per data source and competency, and the shape of the episodes: chunks per instance,
tokens per chunk, questions per instance, chunk-QA pairs per chunk. Tokens are whitespace words
unless a counter is given (the same default as the readers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finemem.data.readers import FORMATS, CountTokens, count_words, load_instances_with_report
from finemem.records import Instance


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0, "total": 0}
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values), "total": sum(values)}


def summarize(instances: Sequence[Instance], count_tokens: CountTokens | None = None) -> dict[str, Any]:
    """Counts and min/mean/max shapes of a list of instances (plain JSON-able dict)."""
    count = count_tokens or count_words
    chunk_tokens = [count(c) for inst in instances for c in inst.chunks]
    chunk_qa = [len(qs) for inst in instances for qs in inst.chunk_qa]
    return {
        "instances": len(instances),
        "per_source": dict(sorted(Counter(i.data_source for i in instances).items())),
        "per_competency": dict(sorted(Counter(i.competency for i in instances).items())),
        "chunks_per_instance": _stats([len(i.chunks) for i in instances]),
        "tokens_per_chunk": _stats(chunk_tokens),
        "questions_per_instance": _stats([len(i.questions) for i in instances]),
        "chunk_qa_per_chunk": _stats(chunk_qa),
        "chunks_without_chunk_qa": sum(1 for n in chunk_qa if n == 0),
    }


def _fmt(x: float) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def print_summary(summary: dict[str, Any], title: str) -> None:
    """A readable table (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = Table(title=f"{title}: {summary['instances']} instances")
    counts.add_column("group")
    counts.add_column("name")
    counts.add_column("instances", justify="right")
    for group in ("per_source", "per_competency"):
        for name, n in summary[group].items():
            counts.add_row(group.removeprefix("per_"), name, str(n))
    console.print(counts)

    shapes = Table(title="shapes")
    for col in ("quantity", "min", "mean", "max", "total"):
        shapes.add_column(col, justify="left" if col == "quantity" else "right")
    for key in ("chunks_per_instance", "tokens_per_chunk", "questions_per_instance", "chunk_qa_per_chunk"):
        s = summary[key]
        shapes.add_row(key.replace("_", " "), *(_fmt(s[k]) for k in ("min", "mean", "max", "total")))
    console.print(shapes)
    console.print(f"chunks without chunk QA: {summary['chunks_without_chunk_qa']}")


def cli(argv: list[str]) -> int:
    """`finemem data inspect PATH [--format F] [--json] [--chunk-tokens N] [--skip-bad-rows]`."""
    from finemem.cli import parse_command

    parser = argparse.ArgumentParser(prog="finemem data inspect", description="Summarise a data file.")
    parser.add_argument("path", help="jsonl, Memalpha parquet or MemoryAgentBench parquet")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="MAB sentence-packing budget (words)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows")
    args, _ = parse_command(parser, argv)
    try:
        instances, report = load_instances_with_report(
            args.path, fmt=args.format, chunk_tokens=args.chunk_tokens, skip_bad_rows=args.skip_bad_rows
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"finemem data inspect: {e}", file=sys.stderr)
        return 2
    summary = summarize(instances)
    summary["load"] = {
        "path": report.path,
        "format": report.fmt,
        "rows_read": report.rows_read,
        "skipped": [vars(s) for s in report.skipped],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, f"{report.path} ({report.fmt})")
        if report.skipped:
            print(report.summary())
    return 0
