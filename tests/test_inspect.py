"""`finemem data inspect`: summary numbers and both output modes."""

from __future__ import annotations

import json

import pytest

from finemem.data.inspect import cli, summarize
from finemem.data.readers import write_jsonl
from finemem.records import Instance, QAPair


def _instances() -> list[Instance]:
    q = QAPair("q", ["a"])
    return [
        Instance("a", ["one two three", "four"], [q, q, q], [[q, q], [q]], "squad", "accurate_retrieval"),
        Instance("b", ["five six"], [q], [[]], "booksum", "long_range_understanding"),
        Instance("c", ["seven eight nine ten", "x", "y"], [q, q], data_source="squad"),
    ]


def test_summarize_counts_and_shapes():
    s = summarize(_instances())
    assert s["instances"] == 3
    assert s["per_source"] == {"booksum": 1, "squad": 2}
    assert s["per_competency"] == {"accurate_retrieval": 2, "long_range_understanding": 1}
    assert s["chunks_per_instance"] == {"min": 1, "mean": 2.0, "max": 3, "total": 6}
    assert s["tokens_per_chunk"] == {"min": 1, "mean": 12 / 6, "max": 4, "total": 12}
    assert s["questions_per_instance"] == {"min": 1, "mean": 2.0, "max": 3, "total": 6}
    assert s["chunk_qa_per_chunk"] == {"min": 0, "mean": 0.5, "max": 2, "total": 3}
    assert s["chunks_without_chunk_qa"] == 4


def test_summarize_custom_counter_and_empty():
    s = summarize(_instances(), count_tokens=len)
    assert s["tokens_per_chunk"]["max"] == len("seven eight nine ten")
    empty = summarize([])
    assert empty["instances"] == 0 and empty["tokens_per_chunk"]["mean"] == 0.0


def test_cli_json_and_table(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    write_jsonl(_instances(), path)
    assert cli([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_source"] == {"booksum": 1, "squad": 2}
    assert out["load"] == {"path": str(path), "format": "jsonl", "rows_read": 3, "skipped": []}

    assert cli([str(path)]) == 0
    table = capsys.readouterr().out
    assert "3 instances" in table and "booksum" in table and "tokens per chunk" in table


def test_cli_bad_rows(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    write_jsonl(_instances(), path)
    with path.open("a") as f:
        f.write('{"instance_id": "broken"}\n')
    assert cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 4" in err and "field 'chunks'" in err

    assert cli([str(path), "--skip-bad-rows", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["instances"] == 3
    assert out["load"]["skipped"] == [{"row": "line 4", "field": "chunks", "reason": "missing"}]


@pytest.mark.parametrize("argv", [["--format", "csv"]])
def test_cli_rejects_unknown_format(tmp_path, argv):
    with pytest.raises(SystemExit):
        cli([str(tmp_path / "x.jsonl"), *argv])
