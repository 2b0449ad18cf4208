"""Fuzzing the dataset readers (jsonl, Memalpha parquet, MemoryAgentBench parquet) with hypothesis.

Each example is one file: valid rows around one mutated row (a field missing, of the wrong type,
empty, huge or unicode, malformed JSON in a JSON-string field, an extra field). The contract
checked: valid rows load into Instances; a bad row raises ValueError naming the file, the row and
the field, and with `skip_bad_rows=True` it is skipped and reported; no other exception type.
"""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from finemem.data.readers import load_instances, load_instances_with_report
from finemem.records import COMPETENCIES

SOURCES = [
    "squad",
    "hotpotqa",
    "pubmed-rct",
    "booksum",
    "factconsolidation_sh_6k",
    "ruler_qa1_197K",
    "longmemeval_s",
    "eventqa_full",
    "infbench_sum",
    "icl_banking77",
    "recsys_redial",
    "detective_qa",
]
HUGE = "lorem ipsum dolor. " * 3000

text = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "é漢字🙂 ok.", "\u2028\x00\ttab", HUGE]))
nonblank = text.filter(lambda t: t.strip() != "")
# values pyarrow can store in a column of its own type (lists of one element type only)
wrong_type = st.sampled_from([1, -7, 1.5, True, "word", b"\xff\xfe", [1, 2], ["x"], [], {"a": 1}, None])
bad_json = st.one_of(
    st.sampled_from(["[", "{bad", "[1,", "'single'", "nul", "", "[" * 5000]),
    # never closed: never valid JSON; one line (a newline or \r, which text mode reads as one, would
    # make the row two lines of the file)
    st.text(max_size=10).map(lambda t: "{" + t.replace("}", "").replace("\n", "").replace("\r", "")),
)
answer = st.one_of(text, st.lists(text, min_size=1, max_size=3), st.integers(-3, 3))
qa = st.fixed_dictionaries({"question": text, "answer": answer})
qas = st.lists(qa, max_size=3)


class Case:
    """Rows to write, and per row what must happen: ("ok",) or ("bad" | "either", fields it may name)."""

    def __init__(self, rows: list, expect: list):
        self.rows, self.expect = rows, expect


def top(field: str) -> str:
    """'questions[0].answer' -> 'questions'; 'metadata.source' -> 'metadata'."""
    return field.split("[")[0].split(".")[0]


def check(path: Path, fmt: str, case: Case, labels: list[str]) -> None:
    """The reader contract over one file; `labels` are the readers' row names ("line 3", "row 1")."""
    insts, report = load_instances_with_report(path, fmt=fmt, skip_bad_rows=True)
    assert report.rows_read == len(case.rows)
    assert report.instances + report.num_skipped == len(case.rows) == len(insts) + report.num_skipped
    skipped = {s.row: s for s in report.skipped}
    for label, expect in zip(labels, case.expect):
        if expect[0] == "ok":
            assert label not in skipped, f"{label} is valid but was skipped: {skipped.get(label)}"
        elif expect[0] == "bad":
            assert label in skipped, f"{label} is bad but loaded"
        if label in skipped:
            assert expect[0] != "ok"
            assert top(skipped[label].field) in expect[1], (label, skipped[label], expect)
            assert f"skipped {label}: field" in report.summary()
    if not report.skipped:
        assert load_instances(path, fmt=fmt) == insts
        return
    first = report.skipped[0]
    try:
        load_instances(path, fmt=fmt)
    except ValueError as e:
        msg = str(e)
        assert msg.startswith(f"{path}: {first.row}: field {first.field!r}: "), msg
    else:
        raise AssertionError("a bad row loaded without skip_bad_rows")


# ------------------------------------------------------------------------------------------
# jsonl
# ------------------------------------------------------------------------------------------


@st.composite
def jsonl_row(draw) -> dict:
    chunks = draw(st.lists(text, min_size=1, max_size=3))
    row = {"instance_id": draw(st.one_of(text, st.integers())), "chunks": chunks, "questions": draw(qas)}
    if draw(st.booleans()):
        row["chunk_qa"] = [draw(qas) for _ in chunks]
    if draw(st.booleans()):
        row["competency"] = draw(st.sampled_from(COMPETENCIES))
        row["data_source"] = draw(text)
        row["metadata"] = draw(st.dictionaries(st.text(max_size=5), text, max_size=2))
    return row


JSONL_FIELDS = ["instance_id", "chunks", "questions", "chunk_qa", "competency", "metadata", "data_source"]


@st.composite
def jsonl_case(draw) -> Case:
    good = draw(jsonl_row())
    bad = dict(draw(jsonl_row()))
    kind = draw(
        st.sampled_from(
            ["valid", "missing", "wrong_type", "empty", "extra", "not_object", "not_json", "not_utf8"]
        )
    )
    name = draw(st.sampled_from(JSONL_FIELDS))
    line: str | bytes
    expect: tuple = ("either", {name})
    if kind == "valid":
        expect = ("ok",)
    elif kind == "missing":
        if name in ("instance_id", "chunks", "questions"):
            expect = ("bad", {name})
        else:
            expect = ("ok",)
        bad.pop(name, None)
    elif kind == "wrong_type":
        bad[name] = draw(wrong_type)
    elif kind == "empty":
        bad[name] = ""
    elif kind == "extra":
        bad[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in JSONL_FIELDS))] = draw(text)
        expect = ("ok",)
    line = json.dumps(bad, ensure_ascii=draw(st.booleans()), default=repr)
    if kind == "not_object":
        line, expect = (
            json.dumps(draw(st.one_of(text, st.integers(), st.lists(st.integers())))),
            ("bad", {"<row>"}),
        )
    elif kind == "not_json":
        line, expect = draw(bad_json), ("bad", {"<row>"})
        if not line.strip():
            line = "{"
    elif kind == "not_utf8":
        line, expect = b'{"instance_id": "\xff\xfe"}', ("bad", {"<row>"})
    return Case([json.dumps(good), line, json.dumps(good)], [("ok",), expect, ("ok",)])


@settings(max_examples=150, deadline=None)
@given(jsonl_case())
def test_jsonl_rows(case):
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        with path.open("wb") as f:
            for line in case.rows:
                f.write((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n")
        check(path, "jsonl", case, ["line 1", "line 2", "line 3"])


# ------------------------------------------------------------------------------------------
# Parquet: one file per example; the mutated row between two valid ones when the column types
# allow it, alone otherwise (a parquet column holds one type)
# ------------------------------------------------------------------------------------------


def write_parquet(path: Path, good: dict, bad: dict, expect: tuple) -> tuple[Case, list[str]]:
    for rows, expects in (([good, bad, good], [("ok",), expect, ("ok",)]), ([bad], [expect])):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        try:
            table = pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns})
            # A column's type is the whole file's: if the bad value changes what the good rows read
            # back (bytes beside strings makes the column binary), the rows are not independent.
            if len(rows) > 1 and any(good.get(c) is not None and table[c].type != pa.array([good[c]]).type
                                     for c in columns):
                continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            continue
        pq.write_table(table, path)
        return Case(rows, expects), [f"row {i}" for i in range(len(rows))]
    raise AssertionError("unreachable: a single row always has a schema")


def mutate(
    draw, row: dict, fields: list[str], required: set[str], json_fields: set[str]
) -> tuple[dict, tuple]:
    """A copy of `row` with one mutation, and what the reader must do with it."""
    bad = dict(row)
    name = draw(st.sampled_from(fields))
    kind = draw(st.sampled_from(["valid", "missing", "wrong_type", "empty", "extra", "bad_json", "huge"]))
    if kind == "valid":
        return bad, ("ok",)
    if kind == "missing":
        bad[name] = None
        return bad, (("bad", {name}) if name in required else ("ok",))
    if kind == "extra":
        bad["extra_column"] = draw(text)
        return bad, ("ok",)
    if kind == "bad_json" and name in json_fields:
        bad[name] = draw(bad_json)
        return bad, ("bad", {name})
    bad[name] = {"wrong_type": draw(wrong_type), "empty": "", "huge": HUGE}.get(kind, draw(text))
    return bad, ("either", {name})


# ------------------------------------------------------------------------------------------
# Memalpha parquet
# ------------------------------------------------------------------------------------------

MEMALPHA_FIELDS = [
    "instance_id",
    "chunks",
    "questions_and_answers",
    "data_source",
    "metadata",
    "num_chunks",
    "num_questions",
    "chunk_qa",
]


@st.composite
def memalpha_row(draw) -> dict:
    chunks = draw(st.lists(text, min_size=1, max_size=3))
    questions = draw(qas)
    as_json = draw(st.booleans())  # Memalpha stores JSON strings; decoded lists are accepted too
    return {
        "instance_id": draw(nonblank),
        "chunks": json.dumps(chunks) if as_json else chunks,
        "questions_and_answers": json.dumps(questions),
        "data_source": draw(st.sampled_from(SOURCES)),
        "metadata": draw(
            st.one_of(st.none(), st.dictionaries(st.text(max_size=5), text, max_size=2).map(json.dumps))
        ),
        "num_chunks": draw(st.sampled_from([None, len(chunks)])),
        "num_questions": draw(st.sampled_from([None, len(questions)])),
        "chunk_qa": draw(st.one_of(st.none(), st.just(json.dumps([draw(qas) for _ in chunks])))),
    }


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_memalpha_rows(data):
    good, row = data.draw(memalpha_row()), data.draw(memalpha_row())
    bad, expect = mutate(
        data.draw,
        row,
        MEMALPHA_FIELDS,
        {"instance_id", "chunks", "questions_and_answers", "data_source"},
        {"chunks", "questions_and_answers", "metadata", "chunk_qa"},
    )
    if expect[0] == "either" and expect[1] & {"chunks", "questions_and_answers"}:
        expect = (
            "either",
            expect[1] | {"num_chunks", "num_questions", "chunk_qa"},
        )  # counts may then disagree
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.parquet"
        case, labels = write_parquet(path, good, bad, expect)
        check(path, "memalpha", case, labels)


# ------------------------------------------------------------------------------------------
# MemoryAgentBench parquet
# ------------------------------------------------------------------------------------------

MAB_FIELDS = ["context", "questions", "answers", "metadata"]


@st.composite
def mab_row(draw) -> dict:
    n = draw(st.integers(1, 3))
    questions = [draw(text) for _ in range(n)]
    answers = [draw(st.lists(text, min_size=1, max_size=2)) for _ in range(n)]
    metadata = {"source": draw(st.sampled_from(SOURCES)), "qa_pair_ids": [f"q{i}" for i in range(n)]}
    if draw(st.booleans()):  # MAB stores lists and a struct; JSON strings are accepted too
        return {
            "context": draw(nonblank),
            "questions": json.dumps(questions),
            "answers": json.dumps(answers),
            "metadata": json.dumps(metadata),
        }
    return {"context": draw(nonblank), "questions": questions, "answers": answers, "metadata": metadata}


@settings(max_examples=120, deadline=None)
@given(st.data(), st.integers(1, 64))
def test_mab_rows(data, chunk_tokens):
    good, row = data.draw(mab_row()), data.draw(mab_row())
    bad, expect = mutate(data.draw, row, MAB_FIELDS, set(MAB_FIELDS), {"questions", "answers", "metadata"})
    if expect[0] != "ok":
        # a wrong questions list can make answers disagree in length; a wrong source has no competency
        expect = (expect[0], expect[1] | {"answers", "data_source"})
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.parquet"
        case, labels = write_parquet(path, good, bad, expect)
        check(path, "mab", case, labels)
        insts, _ = load_instances_with_report(path, fmt="mab", chunk_tokens=chunk_tokens, skip_bad_rows=True)
        for inst in insts:  # packed chunks are slices of the context, in order
            assert inst.chunks and all(c.strip() for c in inst.chunks)


# ------------------------------------------------------------------------------------------
# The defects the fuzzing found, pinned as plain examples
# ------------------------------------------------------------------------------------------


def test_found_jsonl_line_not_utf8_is_a_bad_row(tmp_path):
    """A line with invalid UTF-8 raised UnicodeDecodeError for the whole file, even when skipping."""
    good = json.dumps({"instance_id": "a", "chunks": ["c"], "questions": []}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b'\n{"instance_id": "\xff"}\n' + good + b"\n")
    insts, report = load_instances_with_report(path, skip_bad_rows=True)
    assert len(insts) == 2 and report.skipped[0].row == "line 2" and "UTF-8" in report.skipped[0].reason
    try:
        load_instances(path)
    except ValueError as e:
        assert str(e).startswith(f"{path}: line 2: field '<row>': not valid UTF-8")
    else:
        raise AssertionError("loaded")


def test_found_deeply_nested_json_is_a_bad_row(tmp_path):
    """JSON nested deeper than the recursion limit raised RecursionError."""
    path = tmp_path / "d.jsonl"
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    _, report = load_instances_with_report(path, skip_bad_rows=True)
    assert report.skipped[0].field == "<row>" and "nested too deeply" in report.skipped[0].reason
    row = {"instance_id": "x", "chunks": "[" * 100000, "questions_and_answers": "[]", "data_source": "squad"}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "m.parquet")
    _, report = load_instances_with_report(tmp_path / "m.parquet", skip_bad_rows=True)
    assert report.skipped[0].field == "chunks" and "nested too deeply" in report.skipped[0].reason


def test_found_parquet_binary_not_utf8_is_a_bad_row(tmp_path):
    """A binary JSON column holding invalid UTF-8 raised UnicodeDecodeError."""
    row = {"instance_id": "x", "chunks": b"\xff[", "questions_and_answers": b"[]", "data_source": "squad"}
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "m.parquet")
    _, report = load_instances_with_report(tmp_path / "m.parquet", skip_bad_rows=True)
    assert report.skipped[0].field == "chunks" and "not valid UTF-8" in report.skipped[0].reason
