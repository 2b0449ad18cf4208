"""Load a train or eval split the way every command does: format from the file, one-line errors.

`finemem train`, `finemem eval` and `finemem ablation` read their splits through `load_split`.
The format is taken from the file's bytes, not only its name: a parquet file starts with the magic
`PAR1`, and its columns say Memalpha or MemoryAgentBench. An explicit `data.format` that does not
match the file stops with one line naming the file (before, a parquet read as jsonl crashed with a
UnicodeDecodeError traceback).
"""

from __future__ import annotations

from pathlib import Path

from finemem.config import ConfigError
from finemem.data.readers import FORMATS, load_instances
from finemem.records import Instance

PARQUET_MAGIC = b"PAR1"


def sniff_format(path: str | Path) -> str:
    """jsonl | memalpha | mab, from the file's content (parquet magic and columns), whatever its name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such data file")
    with path.open("rb") as f:
        head = f.read(4)
    if head != PARQUET_MAGIC:
        return "jsonl"
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        columns = set(pq.ParquetFile(path).schema_arrow.names)
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from e
    if {"chunks", "questions_and_answers"} <= columns:
        return "memalpha"
    if {"context", "questions", "answers"} <= columns:
        return "mab"
    raise ConfigError(f"{path}: parquet columns {sorted(columns)} match neither Memalpha (chunks, "
                      "questions_and_answers, ...) nor MemoryAgentBench (context, questions, answers, metadata)")


_NAMES = {"jsonl": "a jsonl file", "memalpha": "a Memalpha parquet file", "mab": "a MemoryAgentBench parquet file"}


def resolve_format(path: str | Path, fmt: str = "auto") -> str:
    """The format to read `path` with: the detected one for "auto"; an explicit one only if it matches."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r}: choose one of {', '.join(FORMATS)}")
    detected = sniff_format(path)
    if fmt != "auto" and fmt != detected:
        raise ConfigError(f"{path}: data.format={fmt} but the file is {_NAMES[detected]}; "
                          f"set data.format=auto (or data.format={detected})")
    return detected


def load_split(cfg, path: str | Path, limit: int | None = None) -> list[Instance]:
    """The instances of one split (`data.format`, `data.chunk_tokens`, `data.skip_bad_rows`; at most
    `limit`). Bad input stops with one line naming the file (and row and field)."""
    fmt = resolve_format(path, str(cfg.data.format))
    try:
        instances = load_instances(path, fmt=fmt, chunk_tokens=int(cfg.data.chunk_tokens),
                                   skip_bad_rows=bool(cfg.data.skip_bad_rows), max_instances=limit)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(" ".join(str(e).split())) from e
    if not instances:
        raise ConfigError(f"{path}: no instances")
    return instances
