"""Readers: Memalpha and MAB parquet (built here with pyarrow), jsonl, sentence packing, bad rows."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finemem.data.readers import (
    count_words,
    detect_format,
    load_instances,
    load_instances_with_report,
    pack_sentences,
    read_jsonl,
    split_sentences,
    write_jsonl,
)
from finemem.records import Instance, QAPair

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FACTCONS_6K = SHARED / "data" / "mab_factconsolidation" / "factconsolidation_6k_context.txt"


def memalpha_row(i: int, **over) -> dict:
    row = {
        "instance_id": f"inst-{i}",
        "chunks": json.dumps([f"chunk {i} a", f"chunk {i} b"]),
        "questions_and_answers": json.dumps(
            [{"question": "Who?", "answer": "Mira"}, {"question": "Where?", "answer": ["Oslo", "Christiania"]}]
        ),
        "data_source": "squad",
        "metadata": json.dumps({"origin": "test"}),
        "num_chunks": 2,
        "num_questions": 2,
    }
    row.update(over)
    return row


def write_memalpha(path: Path, rows: list[dict], with_chunk_qa: bool = False) -> Path:
    cols = ["instance_id", "chunks", "questions_and_answers", "data_source", "metadata", "num_chunks",
            "num_questions"] + (["chunk_qa"] if with_chunk_qa else [])
    table = pa.table({c: [r.get(c) for r in rows] for c in cols})
    pq.write_table(table, path)
    return path


def write_mab(path: Path, rows: list[dict]) -> Path:
    schema = pa.schema(
        [
            ("context", pa.string()),
            ("questions", pa.list_(pa.string())),
            ("answers", pa.list_(pa.list_(pa.string()))),
            ("metadata", pa.struct([("source", pa.string()), ("qa_pair_ids", pa.list_(pa.string()))])),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


MAB_CONTEXT = "Here is a list of facts:\n0. Mira lives in Oslo.\n1. Mira moved to Bergen. She likes it!\n2. Ole is 40."


def mab_row(source="factconsolidation_sh_6k", **over) -> dict:
    row = {
        "context": MAB_CONTEXT,
        "questions": ["Where does Mira live?", "How old is Ole?"],
        "answers": [["Bergen"], ["40", "forty"]],
        "metadata": {"source": source, "qa_pair_ids": ["q0", "q1"]},
    }
    row.update(over)
    return row


# --------------------------------------------------------------------------------------------
# Memalpha parquet
# --------------------------------------------------------------------------------------------


def test_memalpha_parquet_rows_become_instances(tmp_path):
    rows = [memalpha_row(0), memalpha_row(1, data_source="pubmed-rct", questions_and_answers=json.dumps(
        [{"question": "label?", "answer": 3}]), num_questions=1)]
    path = write_memalpha(tmp_path / "train.parquet", rows)
    assert detect_format(path) == "memalpha"
    insts = load_instances(path)
    assert [i.instance_id for i in insts] == ["inst-0", "inst-1"]
    a = insts[0]
    assert a.chunks == ["chunk 0 a", "chunk 0 b"]
    assert a.questions == [QAPair("Who?", ["Mira"]), QAPair("Where?", ["Oslo", "Christiania"])]
    assert a.chunk_qa == [[], []]
    assert a.data_source == "squad" and a.competency == "accurate_retrieval"
    assert a.metadata == {"origin": "test"}
    assert insts[1].competency == "test_time_learning"
    assert insts[1].questions[0].answers == ["3"]  # numeric labels become strings


def test_memalpha_chunk_qa_column(tmp_path):
    cqa = [[{"question": "q0", "answer": "a0"}], [{"question": "q1", "answer": ["a1", "b1"]}]]
    path = write_memalpha(tmp_path / "d.parquet", [memalpha_row(0, chunk_qa=json.dumps(cqa))], with_chunk_qa=True)
    (inst,) = load_instances(path)
    assert inst.chunk_qa == [[QAPair("q0", ["a0"])], [QAPair("q1", ["a1", "b1"])]]


@pytest.mark.parametrize(
    "over,row_field,reason",
    [
        ({"chunks": "[not json"}, "chunks", "invalid JSON"),
        ({"chunks": None}, "chunks", "missing"),
        ({"chunks": json.dumps([1, 2])}, "chunks", "expected a list of strings"),
        ({"questions_and_answers": json.dumps([{"answer": "x"}])}, "questions_and_answers[0].question", "missing"),
        ({"questions_and_answers": json.dumps([{"question": "q"}])}, "questions_and_answers[0].answer", "missing"),
        ({"metadata": "{bad"}, "metadata", "invalid JSON"),
        ({"metadata": json.dumps([1])}, "metadata", "expected a JSON object"),
        ({"num_chunks": 3}, "num_chunks", "says 3 but the row has 2"),
        ({"data_source": "mystery"}, "data_source", "unknown data source"),
        ({"instance_id": None}, "instance_id", "missing"),
        ({"chunk_qa": json.dumps([[]])}, "chunk_qa", "has 1 entries but there are 2 chunks"),
    ],
)
def test_memalpha_bad_row_names_file_row_and_field(tmp_path, over, row_field, reason):
    rows = [memalpha_row(0), memalpha_row(1, **over), memalpha_row(2)]
    path = write_memalpha(tmp_path / "bad.parquet", rows, with_chunk_qa="chunk_qa" in over)
    with pytest.raises(ValueError) as err:
        load_instances(path)
    msg = str(err.value)
    assert str(path) in msg and "row 1" in msg and f"field {row_field!r}" in msg and reason in msg

    insts, report = load_instances_with_report(path, skip_bad_rows=True)
    assert [i.instance_id for i in insts] == ["inst-0", "inst-2"]
    assert report.rows_read == 3 and report.instances == 2 and report.num_skipped == 1
    (skipped,) = report.skipped
    assert skipped.row == "row 1" and skipped.field == row_field and reason in skipped.reason
    assert "skipped row 1" in report.summary()


def test_max_instances_stops_early(tmp_path):
    path = write_memalpha(tmp_path / "d.parquet", [memalpha_row(i) for i in range(5)])
    insts, report = load_instances_with_report(path, max_instances=2)
    assert [i.instance_id for i in insts] == ["inst-0", "inst-1"] and report.rows_read == 2


def test_unknown_parquet_columns_and_extension(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"foo": [1]}), path)
    with pytest.raises(ValueError, match="match neither Memalpha"):
        load_instances(path)
    with pytest.raises(ValueError, match="not a mab parquet file: missing column"):
        load_instances(path, fmt="mab")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="broken.parquet: not a readable parquet file"):
        load_instances(broken)
    other = tmp_path / "x.csv"
    other.write_text("a\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_instances(other)
    with pytest.raises(FileNotFoundError):
        load_instances(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="unknown data format"):
        load_instances(path, fmt="csv")


# --------------------------------------------------------------------------------------------
# MemoryAgentBench parquet
# --------------------------------------------------------------------------------------------


def test_mab_parquet_rows_are_packed_into_sentence_chunks(tmp_path):
    path = write_mab(tmp_path / "cr.parquet", [mab_row(), mab_row("ruler_qa1_197K")])
    assert detect_format(path) == "mab"
    insts = load_instances(path, chunk_tokens=8)
    a, b = insts
    assert a.instance_id == "factconsolidation_sh_6k#0" and b.instance_id == "ruler_qa1_197K#1"
    assert a.competency == "conflict_resolution" and b.competency == "accurate_retrieval"
    assert a.questions == [QAPair("Where does Mira live?", ["Bergen"]), QAPair("How old is Ole?", ["40", "forty"])]
    assert a.metadata["source"] == "factconsolidation_sh_6k" and a.metadata["qa_pair_ids"] == ["q0", "q1"]
    assert a.chunks == [
        "Here is a list of facts:",
        "0. Mira lives in Oslo.",
        "1. Mira moved to Bergen. She likes it!",
        "2. Ole is 40.",
    ]
    assert all(count_words(c) <= 8 for c in a.chunks)
    # a larger budget packs more sentences per chunk, keeping the text between them exactly
    (big,) = load_instances(path, chunk_tokens=1000, max_instances=1)
    assert big.chunks == [MAB_CONTEXT]


def test_mab_custom_token_counter(tmp_path):
    path = write_mab(tmp_path / "cr.parquet", [mab_row()])
    (inst,) = load_instances(path, chunk_tokens=30, count_tokens=len)  # characters as tokens
    assert all(len(c) <= 30 or len(split_sentences(c)) == 1 for c in inst.chunks)
    assert len(inst.chunks) > 1


@pytest.mark.parametrize(
    "over,row_field,reason",
    [
        ({"answers": [["Bergen"]]}, "answers", "has 1 entries for 2 questions"),
        ({"context": ""}, "context", "expected a non-empty string"),
        ({"context": None}, "context", "missing"),
        ({"metadata": {"source": None, "qa_pair_ids": []}}, "metadata.source", "missing"),
        ({"answers": [["Bergen"], []]}, "answers[1]", "has no gold answer"),
    ],
)
def test_mab_bad_row_names_file_row_and_field(tmp_path, over, row_field, reason):
    path = write_mab(tmp_path / "bad.parquet", [mab_row(), mab_row(**over)])
    with pytest.raises(ValueError) as err:
        load_instances(path)
    msg = str(err.value)
    assert str(path) in msg and "row 1" in msg and f"field {row_field!r}" in msg and reason in msg
    insts, report = load_instances_with_report(path, skip_bad_rows=True)
    assert len(insts) == 1 and report.num_skipped == 1 and report.skipped[0].field == row_field


# --------------------------------------------------------------------------------------------
# jsonl
# --------------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    insts = [
        Instance("a", ["c1 é", "c2"], [QAPair("q", ["x", "y"])], [[QAPair("cq", ["z"])], []],
                 "synthetic", "conflict_resolution", {"seed": 1}),
        Instance("b", ["only"], [QAPair("q2", ["w"])]),
    ]
    path = tmp_path / "sub" / "data.jsonl"
    write_jsonl(insts, path)
    assert "é" in path.read_text(encoding="utf-8")
    assert read_jsonl(path) == insts
    assert load_instances(path) == insts  # auto: by extension


@pytest.mark.parametrize(
    "line,row_field,reason",
    [
        ("{not json", "<row>", "invalid JSON"),
        ('{"instance_id": "x", "questions": []}', "chunks", "missing"),
        ('{"instance_id": "x", "chunks": ["c"], "questions": [{"question": "q", "answers": 5.5}]}',
         "questions[0].answer", None),
        ('{"instance_id": "x", "chunks": ["c"], "questions": [], "competency": "luck"}', "competency",
         "is not one of"),
        ('{"instance_id": "x", "chunks": ["c"], "questions": [], "chunk_qa": [[], []]}', "chunk_qa",
         "has 2 entries but there are 1 chunks"),
        ("[1, 2]", "<row>", "expected a JSON object"),
    ],
)
def test_jsonl_bad_line(tmp_path, line, row_field, reason):
    good = json.dumps(Instance("ok", ["c"], [QAPair("q", ["a"])]).to_dict())
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    if reason is None:  # a number is accepted as a label alias
        assert len(load_instances(path)) == 3
        return
    with pytest.raises(ValueError) as err:
        load_instances(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and f"field {row_field!r}" in msg and reason in msg
    insts, report = load_instances_with_report(path, skip_bad_rows=True)
    assert len(insts) == 2 and report.skipped[0].row == "line 3" and report.rows_read == 3


# --------------------------------------------------------------------------------------------
# Sentence packing
# --------------------------------------------------------------------------------------------


def test_split_sentences_rules():
    text = "J. K. Rowling wrote it. Dr. Smith met Mr. Jones in the U.S. Army!  Why?\nNo end here\n\n12. A fact. Then 3. x"
    assert split_sentences(text) == [
        "J. K. Rowling wrote it.",
        "Dr. Smith met Mr. Jones in the U.S. Army!",
        "Why?",
        "No end here",
        "12. A fact.",
        "Then 3.",
        "x",
    ]
    assert split_sentences("   ") == [] and split_sentences("one") == ["one"]
    assert split_sentences("e.g. this one") == ["e.g. this one"]
    assert split_sentences("It ends in plan B. Next.") == ["It ends in plan B. Next."]  # merging is safe


def test_pack_sentences_budget_and_long_sentence():
    long = " ".join(["word"] * 12) + "."
    text = f"One two three. Four five. {long} Six seven. Eight."
    chunks = pack_sentences(text, 5)
    assert chunks == ["One two three. Four five.", long, "Six seven. Eight."]
    with pytest.raises(ValueError, match="budget"):
        pack_sentences(text, 0)
    assert pack_sentences("", 5) == []


def test_pack_real_factconsolidation_context():
    if not FACTCONS_6K.exists():
        pytest.skip(f"shared developer data not present: {FACTCONS_6K}")
    text = FACTCONS_6K.read_text(encoding="utf-8")
    fact_lines = text.splitlines()[1:]
    assert len(fact_lines) == 455
    for budget in (64, 512):
        chunks = pack_sentences(text, budget)
        # budgets hold (no fact line here is longer than 64 words)
        assert all(count_words(c) <= budget for c in chunks)
        # every fact line is whole inside exactly one chunk, in order
        chunk_lines = [line for c in chunks for line in c.split("\n")]
        assert chunk_lines == text.rstrip("\n").split("\n")
        # greedy: the first sentence of a chunk would not have fit in the chunk before it
        for prev, nxt in pairwise(chunks):
            assert count_words(prev) + count_words(split_sentences(nxt)[0]) > budget
    assert len(pack_sentences(text, 512)) == 9
