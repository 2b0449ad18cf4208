"""`finemem data import-mab-results`: one instance from a MemoryAgentBench context and results file.

MemoryAgentBench (MAB) publishes its runs as results files (`main.py`'s `save_results_to_file`):
per question the full prompt (`query`), the golds (`answer`), `query_id` and `qa_pair_id`, with the
run's `dataset_config` (`sub_dataset`, `chunk_size`). The context of a FactConsolidation row is a
separate text file of numbered facts (see ../shared/data/mab_factconsolidation/README.md). This
importer joins the two into one of our jsonl instances, so `finemem eval` can run any manager on
exactly the questions a MAB baseline answered:

- the question is the text after MAB's "Now Answer the Question:" (else the whole query), without
  the trailing "Answer:";
- the context is packed into sentence chunks by MAB's protocol: the chunk size from the results'
  `dataset_config.chunk_size`, unless `data.chunk_tokens=N` is given (whitespace words);
- the qa_pair_ids, query_ids and dataset_config travel in the instance's metadata, so `finemem eval`
  writes its results.json with the benchmark's ids.

Conflict Resolution needs the facts' serial numbers (the larger one is the newer fact), so a
context without `<n>. <fact>` lines is refused for it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from finemem.config import ConfigError
from finemem.data.readers import pack_sentences, write_jsonl
from finemem.records import Instance, QAPair
from finemem.scoring import competency_for_source

QUESTION_MARKER = "Now Answer the Question:"
_NUMBERED_FACT = re.compile(r"^\s*\d+\.\s+\S", re.MULTILINE)


class MabImportError(ValueError):
    """A context or results file that cannot be imported; the message names the file and field."""


def question_from_query(query: str) -> str:
    """The question inside a MAB prompt: after "Now Answer the Question:", without a final "Answer:"."""
    text = query.rsplit(QUESTION_MARKER, 1)[1] if QUESTION_MARKER in query else query
    text = text.strip()
    if text.lower().endswith("answer:"):
        text = text[: -len("answer:")].rstrip()
    return text


def read_results(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(dataset_config, question items) of a MAB results json; every item has `query` and `answer`."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MabImportError(f"{path}: no such results file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MabImportError(f"{path}: not a JSON results file ({e})") from None
    if not isinstance(doc, dict):
        raise MabImportError(f"{path}: expected a JSON object with 'data', got {type(doc).__name__}")
    items = doc.get("data")
    if not isinstance(items, list) or not items:
        raise MabImportError(f"{path}: no queries: field 'data' is missing or empty")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise MabImportError(f"{path}: data[{i}]: expected an object, got {type(item).__name__}")
        if not isinstance(item.get("query"), str) or not item["query"].strip():
            raise MabImportError(f"{path}: data[{i}]: field 'query' is missing or empty (no question to ask)")
        golds = item.get("answer")
        golds = [golds] if isinstance(golds, str) else golds
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise MabImportError(f"{path}: data[{i}]: field 'answer' must be a non-empty list of strings")
    config = doc.get("dataset_config") if isinstance(doc.get("dataset_config"), dict) else {}
    return config, items


def import_mab_results(context_path: str | Path, results_path: str | Path, chunk_tokens: int | None = None,
                       source: str | None = None) -> Instance:
    """The instance: the context packed into chunks, the results file's questions and golds.

    `chunk_tokens`: the packing budget in whitespace words (None: the results' dataset_config.chunk_size).
    `source`: the data source (None: the results' dataset_config.sub_dataset).
    """
    context_path, results_path = Path(context_path), Path(results_path)
    config, items = read_results(results_path)
    source = source or config.get("sub_dataset")
    if not isinstance(source, str) or not source:
        raise MabImportError(f"{results_path}: field 'dataset_config.sub_dataset' is missing; pass --source NAME")
    try:
        competency = competency_for_source(source)
    except ValueError as e:
        raise MabImportError(f"{results_path}: dataset_config.sub_dataset: {e}") from None
    if chunk_tokens is None:
        chunk_tokens = config.get("chunk_size")
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
            raise MabImportError(f"{results_path}: field 'dataset_config.chunk_size' is missing or not a positive "
                               "integer; pass data.chunk_tokens=N")
    if chunk_tokens < 1:
        raise MabImportError(f"data.chunk_tokens={chunk_tokens}: must be >= 1")
    try:
        context = context_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MabImportError(f"{context_path}: no such context file") from None
    except UnicodeDecodeError as e:
        raise MabImportError(f"{context_path}: not UTF-8 text ({e})") from None
    if not context.strip():
        raise MabImportError(f"{context_path}: the context is empty")
    if competency == "conflict_resolution" and not _NUMBERED_FACT.search(context):
        raise MabImportError(f"{context_path}: no numbered facts ('<n>. <fact>' lines), but {source} (Conflict "
                           "Resolution) needs their serial numbers: the larger one is the newer fact")
    questions = [QAPair(question_from_query(it["query"]),
                        [it["answer"]] if isinstance(it["answer"], str) else list(it["answer"])) for it in items]
    metadata = {
        "source": source,
        "qa_pair_ids": [str(it.get("qa_pair_id", f"{source}_no{i}")) for i, it in enumerate(items)],
        "query_ids": [it.get("query_id", i) for i, it in enumerate(items)],
        "chunk_tokens": int(chunk_tokens),
        "context_file": context_path.name,
        "results_file": results_path.name,
        "mab_dataset_config": config,
    }
    return Instance(instance_id=source, chunks=pack_sentences(context, int(chunk_tokens)), questions=questions,
                    data_source=source, competency=competency, metadata=metadata)


def cli(argv: list[str]) -> int:
    """`finemem data import-mab-results --context FILE --results FILE --out FILE.jsonl [--source NAME]
    [data.chunk_tokens=N]`."""
    from finemem.cli import parse_command

    parser = argparse.ArgumentParser(prog="finemem data import-mab-results", description=cli.__doc__)
    parser.add_argument("--context", required=True, help="MAB context text (e.g. factconsolidation_6k_context.txt)")
    parser.add_argument("--results", required=True, help="MAB results json (its questions, golds, dataset_config)")
    parser.add_argument("--out", required=True, help="the jsonl instance file to write")
    parser.add_argument("--source", default=None, help="data source name (default: dataset_config.sub_dataset)")
    args, overrides = parse_command(parser, argv)
    chunk_tokens = None
    for ov in overrides:
        key, value = ov.split("=", 1)
        if key != "data.chunk_tokens":
            raise ConfigError(f"override {ov!r}: import-mab-results takes only data.chunk_tokens=N")
        try:
            chunk_tokens = int(value)
        except ValueError:
            raise ConfigError(f"override {ov!r}: not an integer") from None
    try:
        instance = import_mab_results(args.context, args.results, chunk_tokens, args.source)
    except MabImportError as e:
        print(f"finemem data import-mab-results: {e}", file=sys.stderr)
        return 2
    write_jsonl([instance], args.out)
    longest = max(len(c.split()) for c in instance.chunks)
    print(f"wrote {args.out}: instance {instance.instance_id} ({instance.competency}), "
          f"{len(instance.chunks)} chunks (budget {instance.metadata['chunk_tokens']} words, longest {longest}), "
          f"{len(instance.questions)} questions")
    return 0
