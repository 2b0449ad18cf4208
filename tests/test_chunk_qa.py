"""`finemem data chunk-qa` end to end against the local OpenAI-compatible server (real HTTP):
generation, verification, deduplication, K per chunk, the resumable cache, per-chunk failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finemem.cli import main as finemem_main
from finemem.data.readers import read_jsonl, write_jsonl
from finemem.data.synth import generate_instances
from reward.chunk_qa import ChunkQACache, MalformedProposals, chunk_key, parse_proposals
from reward.openai_test_server import OpenAITestServer


def test_parse_proposals():
    assert parse_proposals('[{"question": "q", "answer": "a"}]') == [{"question": "q", "answer": "a"}]
    fenced = 'Here you go:\n```json\n[{"question": "q", "answer": "a"}]\n```'
    assert parse_proposals(fenced) == [{"question": "q", "answer": "a"}]
    assert parse_proposals('<think>[1]</think>[{"question": "q", "answer": "a"}]')[0]["answer"] == "a"
    for bad in ("no list here", "[not json]", ""):
        with pytest.raises(MalformedProposals):
            parse_proposals(bad)


def test_cache_skips_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "k1", "status": "ok", "qa": [{"question": "q", "answers": ["a"]}]})
                    + "\n" + '{"key": "k2", "sta')  # fmt: skip
    cache = ChunkQACache(path)
    assert cache.done("k1") and not cache.done("k2")
    assert "line 2: unreadable cache entry" in capsys.readouterr().err


@pytest.fixture
def data(tmp_path):
    instances = generate_instances(3, 11)
    for inst in instances:
        inst.chunk_qa = [[] for _ in inst.chunks]
    src = tmp_path / "in.jsonl"
    write_jsonl(instances, src)
    return instances, src


def _argv(srv, src, out, cache, *extra):
    return [
        "--in", str(src), "--out", str(out), "--no-progress",
        f"chunk_qa.generator.base_url={srv.base_url}", f"chunk_qa.verifier.base_url={srv.base_url}",
        "chunk_qa.generator.backoff_s=0.01", "chunk_qa.verifier.backoff_s=0.01",
        "chunk_qa.generator.max_retries=1", "chunk_qa.verifier.max_retries=1",
        f"chunk_qa.cache_path={cache}", "data.chunk_qa_per_chunk=3", *extra,
    ]  # fmt: skip


def test_end_to_end_generate_verify_dedupe_and_resume(data, tmp_path, capsys):
    instances, src = data
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache.jsonl"
    with OpenAITestServer() as srv:
        srv.model.gen_duplicates = 2  # two copies of the first proposal per call
        srv.model.gen_bad_pairs = 2  # two pairs whose answer is not in the chunk
        rc = finemem_main(["data", "chunk-qa", *_argv(srv, src, out, cache)])
        assert rc == 0
        text = capsys.readouterr().out
        n_chunks = len({c for inst in instances for c in inst.chunks})
        assert f"{n_chunks} unique chunks: 0 from cache, {n_chunks} generated, 0 failed" in text
        assert "'duplicate':" in text and "'verifier_wrong':" in text
        first_requests = len(srv.requests)
        assert first_requests > n_chunks

        got = read_jsonl(out)
        assert [g.instance_id for g in got] == [i.instance_id for i in instances]
        for inst in got:
            for chunk, qas in zip(inst.chunks, inst.chunk_qa):
                assert len(qas) == 3  # K
                assert len({q.question for q in qas}) == 3
                for qa in qas:
                    assert qa.answers[0].lower() in chunk.lower()  # verified from the chunk alone
                    assert not qa.answers[0].startswith("zzq")

        # a rerun reads everything from the cache: no request at all, same output
        rc = finemem_main(["data", "chunk-qa", *_argv(srv, src, tmp_path / "out2.jsonl", cache)])
        assert rc == 0
        assert len(srv.requests) == first_requests
        assert f"{n_chunks} from cache, 0 generated" in capsys.readouterr().out
        assert [i.to_dict() for i in read_jsonl(tmp_path / "out2.jsonl")] == [i.to_dict() for i in got]


def test_a_failing_chunk_is_recorded_and_retried_on_resume(data, tmp_path, capsys):
    instances, src = data
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache.jsonl"
    bad_chunk = instances[1].chunks[0]
    with OpenAITestServer() as srv:
        srv.fail(1000, status=503, match=bad_chunk)
        rc = finemem_main(["data", "chunk-qa", *_argv(srv, src, out, cache)])
        assert rc == 1  # not fatal, but reported
        text = capsys.readouterr().out
        assert " 1 failed" in text and "failure: " in text and "503" in text
        got = read_jsonl(out)
        assert got[1].chunk_qa[0] == []  # the failed chunk keeps its old (empty) chunk QA
        assert all(len(q) == 3 for inst in got for c, q in zip(inst.chunks, inst.chunk_qa) if c != bad_chunk)

        srv.reset()
        rc = finemem_main(["data", "chunk-qa", *_argv(srv, src, out, cache)])
        assert rc == 0
        assert "1 generated, 0 failed" in capsys.readouterr().out
        asked = {m["content"] for b in srv.requests for m in b["messages"] if m["role"] == "user"}
        assert all(bad_chunk in a for a in asked)  # only the failed chunk was asked about again
        assert len(read_jsonl(out)[1].chunk_qa[0]) == 3
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert [x["status"] for x in lines if x["key"] == chunk_key(bad_chunk)] == ["failed", "ok"]


def test_console_command_runs_end_to_end(data, tmp_path):
    """The installed `finemem` command in a separate process against the local endpoint."""
    _, src = data
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache.jsonl"
    exe = Path(sys.executable).with_name("finemem")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "finemem.cli"]
    with OpenAITestServer() as srv:
        proc = subprocess.run(
            [*cmd, "data", "chunk-qa", *[a for a in _argv(srv, src, out, cache) if a != "--no-progress"]],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert proc.returncode == 0, proc.stderr
    assert "0 failed" in proc.stdout and "wrote 3 instances" in proc.stdout
    assert "chunk-qa: 100%" in proc.stderr  # the progress bar
    assert all(len(q) == 3 for inst in read_jsonl(out) for q in inst.chunk_qa)
