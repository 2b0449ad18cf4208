"""Read instances from local files: our jsonl, Memalpha parquet, MemoryAgentBench parquet.

Every reader turns a row into a `records.Instance`. A malformed row raises a ValueError that
names the file, the row and the field; with `skip_bad_rows=True` the row is skipped instead and
recorded, with its reason, in the `LoadReport` (never dropped silently).

Row numbers: jsonl rows are 1-based line numbers ("line 3"); parquet rows are 0-based row
indices in the file ("row 3").

Token counting (MAB sentence packing, `finemem data inspect`) defaults to `count_words`, a
whitespace word counter: no tokenizer is needed to read data, and the budget is then a word
budget. Pass the policy tokenizer's counter for a token budget.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemem.records import COMPETENCIES, Instance, QAPair
from finemem.scoring import competency_for_source

CountTokens = Callable[[str], int]
FORMATS = ("auto", "jsonl", "memalpha", "mab")


def count_words(text: str) -> int:
    """The default token counter: whitespace-separated words."""
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# Sentence packing (MemoryAgentBench contexts)
# ---------------------------------------------------------------------------------------------

# A sentence ends at . ! ? followed by whitespace, or at a line break ...
_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
# ... except after a list number at the start of a sentence ("12. The ...") or after an initial
# or a common abbreviation ("J. K. Rowling", "Dr. Smith", "U.S. Army") on the same line.
_ENUMERATOR = re.compile(r"\d{1,6}\.")
_ABBREVIATION = re.compile(
    r"(?:^|\s)(?:[A-Za-z]|(?:[A-Za-z]\.)+[A-Za-z]|Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|Inc|Ltd|Co|Mt)\.$"
)


def _is_sentence_end(sentence: str, separator: str) -> bool:
    if "\n" in separator:
        return True
    return not (_ENUMERATOR.fullmatch(sentence) or _ABBREVIATION.search(sentence))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of `text`, without surrounding whitespace.

    Boundaries: . ! ? followed by whitespace, and line breaks; a period after a leading list
    number, an initial or a common abbreviation does not end a sentence (merging is always safe:
    it can only make a sentence longer, never split one).
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        if _is_sentence_end(text[start : m.start()].strip(), m.group()):
            spans.append((start, m.start()))
            start = m.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if s < e:
            out.append((s, e))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, each exactly as written."""
    return [text[s:e] for s, e in sentence_spans(text)]


def pack_sentences(text: str, budget: int, count_tokens: CountTokens | None = None) -> list[str]:
    """Greedily pack consecutive sentences into chunks of at most `budget` tokens.

    A sentence is never split: one longer than the budget becomes a chunk of its own. A chunk is
    the original slice of `text` from its first sentence to its last, so sentences and the
    separators between them (spaces, line breaks) are kept exactly. The budget is checked on the
    chunk text itself, so it holds for any counter, not only additive ones.
    """
    if budget < 1:
        raise ValueError(f"chunk token budget must be >= 1, got {budget}")
    count = count_tokens or count_words
    chunks: list[str] = []
    start = end = None  # the open chunk is text[start:end]
    for s, e in sentence_spans(text):
        if start is not None and count(text[start:e]) <= budget:
            end = e
            continue
        if start is not None:
            chunks.append(text[start:end])
        start, end = s, e
    if start is not None:
        chunks.append(text[start:end])
    return chunks


# ---------------------------------------------------------------------------------------------
# Load report and row errors
# ---------------------------------------------------------------------------------------------


class RowError(ValueError):
    """A malformed row: which row, which field, and why."""

    def __init__(self, row: str, fieldname: str, reason: str):
        super().__init__(f"{row}: field {fieldname!r}: {reason}")
        self.row, self.field, self.reason = row, fieldname, reason


@dataclass
class SkippedRow:
    row: str
    field: str
    reason: str


@dataclass
class LoadReport:
    """What a load did: the format read, rows seen, instances kept, rows skipped and why."""

    path: str
    fmt: str
    rows_read: int = 0
    instances: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        head = (
            f"{self.path} ({self.fmt}): {self.rows_read} rows read, {self.instances} instances, "
            f"{self.num_skipped} skipped"
        )
        lines = [head]
        lines += [f"  skipped {s.row}: field {s.field!r}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Field helpers (each raises RowError naming the field)
# ---------------------------------------------------------------------------------------------


def _require(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError(where, name, "missing")
    return row[name]


def _parse_json(text: str | bytes, name: str, where: str) -> Any:
    """json.loads, with every way it fails (bad syntax, bad UTF-8, nesting too deep) a RowError."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise RowError(where, name, f"not valid UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise RowError(where, name, f"invalid JSON ({e})") from e
    except RecursionError as e:
        raise RowError(where, name, "invalid JSON (nested too deeply)") from e


def _decode_json(value: Any, name: str, where: str) -> Any:
    """Memalpha stores lists and dicts as JSON strings; accept already-decoded values too."""
    if isinstance(value, (bytes, bytearray, str)):
        return _parse_json(value, name, where)
    return value


def _str_list(value: Any, name: str, where: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise RowError(where, name, f"expected a list of strings, got {_describe(value)}")
    if not value and not allow_empty:
        raise RowError(where, name, "is empty")
    return list(value)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _aliases(value: Any, name: str, where: str) -> list[str]:
    """Gold answer(s): a string, a number (labels) or a list of them -> list of aliases."""
    items = value if isinstance(value, list) else [value]
    out = []
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (str, int, float)):
            raise RowError(where, name, f"an answer must be a string or a list of strings, got {_describe(value)}")
        out.append(x if isinstance(x, str) else str(x))
    if not out:
        raise RowError(where, name, "has no gold answer")
    return out


def _qa_list(value: Any, name: str, where: str) -> list[QAPair]:
    if not isinstance(value, list):
        raise RowError(where, name, f"expected a list of {{question, answer}}, got {_describe(value)}")
    pairs = []
    for j, qa in enumerate(value):
        if not isinstance(qa, dict):
            raise RowError(where, f"{name}[{j}]", f"expected an object, got {_describe(qa)}")
        if not isinstance(qa.get("question"), str):
            raise RowError(where, f"{name}[{j}].question", "missing or not a string")
        if "answer" not in qa and "answers" not in qa:
            raise RowError(where, f"{name}[{j}].answer", "missing")
        answer = qa["answer"] if "answer" in qa else qa["answers"]
        pairs.append(QAPair(question=qa["question"], answers=_aliases(answer, f"{name}[{j}].answer", where)))
    return pairs


def _competency(source: str, where: str) -> str:
    try:
        return competency_for_source(source)
    except ValueError as e:
        raise RowError(where, "data_source", str(e)) from e


# ---------------------------------------------------------------------------------------------
# Row -> Instance
# ---------------------------------------------------------------------------------------------


def instance_from_jsonl(obj: Any, where: str) -> Instance:
    """Our format: one `Instance.to_dict()` per line."""
    if not isinstance(obj, dict):
        raise RowError(where, "<row>", f"expected a JSON object, got {_describe(obj)}")
    instance_id = _require(obj, "instance_id", where)
    chunks = _str_list(_require(obj, "chunks", where), "chunks", where)
    questions = _qa_list(_require(obj, "questions", where), "questions", where)
    chunk_qa = [
        _qa_list(qs, f"chunk_qa[{i}]", where) for i, qs in enumerate(_list_or_empty(obj, "chunk_qa", where))
    ]
    competency = obj.get("competency") or "accurate_retrieval"
    if competency not in COMPETENCIES:
        raise RowError(where, "competency", f"{competency!r} is not one of {', '.join(COMPETENCIES)}")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RowError(where, "metadata", f"expected an object, got {_describe(metadata)}")
    return _build(where, instance_id, chunks, questions, chunk_qa, str(obj.get("data_source") or "synthetic"),
                  competency, metadata)


def _list_or_empty(obj: dict[str, Any], name: str, where: str) -> list:
    value = obj.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(where, name, f"expected a list, got {_describe(value)}")
    return value


def _build(where, instance_id, chunks, questions, chunk_qa, source, competency, metadata) -> Instance:
    if chunk_qa and len(chunk_qa) != len(chunks):
        raise RowError(where, "chunk_qa", f"has {len(chunk_qa)} entries but there are {len(chunks)} chunks")
    return Instance(
        instance_id=str(instance_id),
        chunks=chunks,
        questions=questions,
        chunk_qa=chunk_qa,
        data_source=source,
        competency=competency,
        metadata=metadata,
    )


def instance_from_memalpha(row: dict[str, Any], where: str) -> Instance:
    """A Memalpha parquet row: JSON-string `chunks`, `questions_and_answers`, `metadata`
    (and `chunk_qa` when the column exists); `num_chunks` / `num_questions` must agree."""
    instance_id = _require(row, "instance_id", where)
    source = _require(row, "data_source", where)
    if not isinstance(source, str) or not source:
        raise RowError(where, "data_source", f"expected a non-empty string, got {_describe(source)}")
    chunks = _str_list(_decode_json(_require(row, "chunks", where), "chunks", where), "chunks", where)
    questions = _qa_list(
        _decode_json(_require(row, "questions_and_answers", where), "questions_and_answers", where),
        "questions_and_answers",
        where,
    )
    for name, actual in (("num_chunks", len(chunks)), ("num_questions", len(questions))):
        declared = row.get(name)
        if declared is not None and not isinstance(declared, int):
            raise RowError(where, name, f"expected an integer, got {_describe(declared)}")
        if declared is not None and declared != actual:
            raise RowError(where, name, f"says {declared} but the row has {actual}")
    metadata = _decode_json(row.get("metadata"), "metadata", where) or {}
    if not isinstance(metadata, dict):
        raise RowError(where, "metadata", f"expected a JSON object, got {_describe(metadata)}")
    chunk_qa: list[list[QAPair]] = []
    if row.get("chunk_qa") is not None:
        raw = _decode_json(row["chunk_qa"], "chunk_qa", where)
        if not isinstance(raw, list):
            raise RowError(where, "chunk_qa", f"expected a list of lists, got {_describe(raw)}")
        chunk_qa = [_qa_list(qs, f"chunk_qa[{i}]", where) for i, qs in enumerate(raw)]
    return _build(where, instance_id, chunks, questions, chunk_qa, source, _competency(source, where), metadata)


def instance_from_mab(
    row: dict[str, Any], where: str, index: int, chunk_tokens: int, count_tokens: CountTokens
) -> Instance:
    """A MemoryAgentBench parquet row: one `context` string packed into sentence chunks,
    `questions` list[str], `answers` list[list[str]] (aliases), `metadata.source`.
    MAB rows carry no id, so the instance id is "<source>#<row index>"."""
    context = _require(row, "context", where)
    if not isinstance(context, str) or not context.strip():
        raise RowError(where, "context", f"expected a non-empty string, got {_describe(context)}")
    questions = _str_list(_decode_json(_require(row, "questions", where), "questions", where), "questions", where)
    answers = _decode_json(_require(row, "answers", where), "answers", where)
    if not isinstance(answers, list):
        raise RowError(where, "answers", f"expected a list of alias lists, got {_describe(answers)}")
    if len(answers) != len(questions):
        raise RowError(where, "answers", f"has {len(answers)} entries for {len(questions)} questions")
    metadata = _decode_json(_require(row, "metadata", where), "metadata", where)
    if not isinstance(metadata, dict):
        raise RowError(where, "metadata", f"expected an object with 'source', got {_describe(metadata)}")
    source = metadata.get("source")
    if not isinstance(source, str) or not source:
        raise RowError(where, "metadata.source", "missing or not a string")
    qas = [
        QAPair(question=q, answers=_aliases(a, f"answers[{j}]", where))
        for j, (q, a) in enumerate(zip(questions, answers))
    ]
    chunks = pack_sentences(context, chunk_tokens, count_tokens)
    return _build(where, f"{source}#{index}", chunks, qas, [], source, _competency(source, where),
                  _jsonable(metadata))


def _jsonable(value: Any) -> Any:
    """Parquet structs may hold numpy / bytes values; keep metadata plain JSON."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Lines are read as bytes and decoded one by one, so a line that is not UTF-8 is a bad row."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {lineno}"
            try:
                yield where, _parse_json(line, "<row>", where)
            except RowError as e:
                yield where, e


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def detect_format(path: str | Path) -> str:
    """jsonl for .jsonl/.json; for .parquet, memalpha or mab by the columns present."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix != ".parquet":
        raise ValueError(f"{path}: cannot tell the format from the extension {path.suffix!r}; pass fmt=")
    columns = set(_parquet_columns(path))
    if {"chunks", "questions_and_answers"} <= columns:
        return "memalpha"
    if {"context", "questions", "answers"} <= columns:
        return "mab"
    raise ValueError(
        f"{path}: parquet columns {sorted(columns)} match neither Memalpha (chunks, questions_and_answers, ...) "
        "nor MemoryAgentBench (context, questions, answers, metadata)"
    )


def load_instances_with_report(
    path: str | Path,
    fmt: str = "auto",
    chunk_tokens: int = 512,
    skip_bad_rows: bool = False,
    count_tokens: CountTokens | None = None,
    max_instances: int | None = None,
) -> tuple[list[Instance], LoadReport]:
    """Read instances and say what happened (see `load_instances`)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    count = count_tokens or count_words
    report = LoadReport(path=str(path), fmt=fmt)
    instances: list[Instance] = []
    for index, where, raw in _rows(path, fmt):
        if max_instances is not None and len(instances) >= max_instances:
            break
        report.rows_read += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            if fmt == "jsonl":
                instances.append(instance_from_jsonl(raw, where))
            elif fmt == "memalpha":
                instances.append(instance_from_memalpha(raw, where))
            else:
                instances.append(instance_from_mab(raw, where, index, chunk_tokens, count))
        except RowError as e:
            if not skip_bad_rows:
                raise ValueError(f"{path}: {e}") from e
            report.skipped.append(SkippedRow(row=e.row, field=e.field, reason=e.reason))
    report.instances = len(instances)
    return instances, report


_REQUIRED_COLUMNS = {
    "memalpha": {"instance_id", "chunks", "questions_and_answers", "data_source"},
    "mab": {"context", "questions", "answers", "metadata"},
}


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, str, Any]]:
    """(index, "line N" / "row N", raw row or the RowError of an unparsable line)."""
    if fmt == "jsonl":
        for index, (where, obj) in enumerate(_iter_jsonl(path)):
            yield index, where, obj
        return
    missing = _REQUIRED_COLUMNS[fmt] - set(_parquet_columns(path))
    if missing:
        raise ValueError(f"{path}: not a {fmt} parquet file: missing column(s) {sorted(missing)}")
    for index, row in _iter_parquet(path):
        yield index, f"row {index}", row


def load_instances(
    path: str | Path,
    fmt: str = "auto",
    chunk_tokens: int = 512,
    skip_bad_rows: bool = False,
    count_tokens: CountTokens | None = None,
    max_instances: int | None = None,
) -> list[Instance]:
    """Read instances from a jsonl, Memalpha parquet or MAB parquet file (fmt "auto": by
    extension, and for parquet by columns). `chunk_tokens` / `count_tokens` are the MAB
    sentence-packing budget and counter (default: whitespace words). `max_instances` stops after
    that many good instances. Bad rows raise ValueError("<file>: row N: field 'x': why") unless
    `skip_bad_rows`, which skips and records them (see `load_instances_with_report`)."""
    instances, _ = load_instances_with_report(path, fmt, chunk_tokens, skip_bad_rows, count_tokens, max_instances)
    return instances


def write_jsonl(instances: list[Instance], path: str | Path) -> None:
    """Write one `Instance.to_dict()` per line (UTF-8, non-ASCII kept); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for inst in instances:
            f.write(json.dumps(inst.to_dict(), ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Instance]:
    """Read a file written by `write_jsonl`."""
    return load_instances(path, fmt="jsonl")
