"""`finemem eval` as a benchmark harness (learner.harness, learner.managers, finemem.benchmark) and
`finemem data import-mab-results` (finemem.data.mab_import).

Fast tests: no engine. The managers that need none (rag, long_context, teacher) run end to end on
synthetic data and on the shared FactConsolidation files; the `openai` manager runs against the
local OpenAI test server (a handler writes tool calls for manager prompts, the rule model answers
questions); the answerer is the evidence reader or that server. They check the MemoryAgentBench
results schema, that `finemem score` recomputes the table's numbers, `--compare`, and the one-line
errors on bad input. The real vLLM server is in tests/test_harness_vllm.py (heavy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finemem.benchmark import QuestionResult, not_prompted_warning, results_doc
from finemem.cli import main
from finemem.config import ConfigError, load_config
from finemem.data.mab_import import MabImportError, import_mab_results, question_from_query
from finemem.data.readers import write_jsonl
from finemem.data.splits import load_split, resolve_format
from finemem.data.synth import generate_instances
from finemem.records import Instance, MemoryItem, QAPair
from finemem.scoring import score_file
from learner.managers import OpenAIManager, build_openai, newest_context
from reward.answerers import AnswererError, ChatReply, answer_messages
from reward.openai_test_server import OpenAITestServer

ROOT = Path(__file__).resolve().parents[1]
FC = ROOT.parent / "shared" / "data" / "mab_factconsolidation"
needs_fc = pytest.mark.skipif(not (FC / "results_sh_6k.json").is_file(), reason="shared FactConsolidation data absent")

MAB_ITEM_KEYS = ["output", "input_len", "output_len", "memory_construction_time", "query_time_len", "parsed_output",
                 "exact_match", "f1", "substring_exact_match", "answer", "query", "query_id", "qa_pair_id"]


@pytest.fixture
def synth_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    write_jsonl(generate_instances(3, 100001), path)
    return path


def _mab_parquet(path: Path, context: str, questions: list[str], answers: list[list[str]], source: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"context": [context], "questions": [questions], "answers": [answers],
                      "metadata": [{"source": source}]})
    pq.write_table(table, path)
    return path


def _last_stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# ---- data format -----------------------------------------------------------------------------------
def test_parquet_is_detected_whatever_the_configured_format(tmp_path, capsys):
    """The bug: the synthetic data group sets data.format=jsonl, so a MAB parquet crashed with a
    UnicodeDecodeError. `--data` now detects the format from the file."""
    path = _mab_parquet(tmp_path / "fc.parquet", "0. Ann lives in Oslo.\n1. Ann lives in Rome.", ["Where does Ann live?"],
                        [["Rome"]], "factconsolidation_sh_6k")
    assert load_config().data.format == "jsonl"  # what the default config says
    out = tmp_path / "out"
    assert main(["eval", "--data", str(path), "--out", str(out), "eval.manager=long_context"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"][0]["answer"] == ["Rome"] and doc["dataset_config"]["sub_dataset"] == "factconsolidation_sh_6k"


def test_explicit_format_that_does_not_match_is_one_line(tmp_path, capsys):
    path = _mab_parquet(tmp_path / "fc.parquet", "Ann lives in Rome.", ["Where?"], [["Rome"]], "ruler_qa1_197K")
    assert main(["eval", "--data", str(path), "eval.manager=rag", "data.format=jsonl"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    assert f"{path}: data.format=jsonl but the file is a MemoryAgentBench parquet file" in captured.err
    cfg = load_config(["data.format=memalpha"])
    with pytest.raises(ConfigError, match=re.escape(f"{path}: data.format=memalpha but the file is a MemoryAgentBench")):
        load_split(cfg, path)


def test_jsonl_named_parquet_and_parquet_named_jsonl(tmp_path, synth_file):
    wrong = tmp_path / "data.parquet"
    wrong.write_bytes(synth_file.read_bytes())
    assert resolve_format(wrong) == "jsonl"  # the content decides, not the name
    pq_as_jsonl = _mab_parquet(tmp_path / "x.jsonl", "A b c.", ["q?"], [["c"]], "ruler_qa1_197K")
    assert resolve_format(pq_as_jsonl) == "mab"
    with pytest.raises(ConfigError, match="no such data file"):
        resolve_format(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instance_id": "x"}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: line 1: field 'chunks': missing")):
        load_split(load_config(), bad)


# ---- MemoryAgentBench import -------------------------------------------------------------------------
def test_question_from_query():
    q = ("Pretend you are a knowledge management system. ...\n\n Now Answer the Question: Based on the provided "
         "Knowledge Pool, Which sport is goaltender associated with? \nAnswer:")
    assert question_from_query(q) == "Based on the provided Knowledge Pool, Which sport is goaltender associated with?"
    assert question_from_query("Who won?\nAnswer:") == "Who won?"


@needs_fc
@pytest.mark.parametrize("variant", ["sh", "mh"])
def test_import_shared_factconsolidation(variant):
    inst = import_mab_results(FC / "factconsolidation_6k_context.txt", FC / f"results_{variant}_6k.json")
    raw = json.loads((FC / f"results_{variant}_6k.json").read_text())
    assert inst.data_source == f"factconsolidation_{variant}_6k" and inst.competency == "conflict_resolution"
    assert len(inst.questions) == 100 and inst.metadata["qa_pair_ids"][7] == raw["data"][7]["qa_pair_id"]
    assert [q.answers for q in inst.questions] == [d["answer"] for d in raw["data"]]
    assert inst.metadata["chunk_tokens"] == raw["dataset_config"]["chunk_size"] == 4096
    assert all(len(c.split()) <= 4096 for c in inst.chunks)
    text = (FC / "factconsolidation_6k_context.txt").read_text()
    lines = [ln for c in inst.chunks for ln in c.splitlines()]
    assert lines == text.strip().splitlines()  # every fact kept, none split, in order
    small = import_mab_results(FC / "factconsolidation_6k_context.txt", FC / f"results_{variant}_6k.json", 100)
    assert len(small.chunks) > 40 and all(len(c.split()) <= 100 for c in small.chunks)


def _results(path: Path, data, config=None) -> Path:
    path.write_text(json.dumps({"dataset_config": config or {"sub_dataset": "factconsolidation_sh_6k",
                                                             "chunk_size": 50}, "data": data}))
    return path


def test_import_bad_inputs_are_one_line(tmp_path, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Here is a list of facts:\n0. Ann lives in Oslo.\n1. Ann lives in Rome.\n")
    no_queries = _results(tmp_path / "empty.json", [])
    rc = main(["data", "import-mab-results", "--context", str(ctx), "--results", str(no_queries),
               "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2
    assert _last_stderr_line(capsys) == (f"finemem data import-mab-results: {no_queries}: no queries: field 'data' is "
                                         "missing or empty")
    no_query = _results(tmp_path / "noq.json", [{"answer": ["Rome"], "query_id": 0}])
    with pytest.raises(MabImportError, match=re.escape(f"{no_query}: data[0]: field 'query' is missing")):
        import_mab_results(ctx, no_query)
    plain = tmp_path / "plain.txt"
    plain.write_text("Ann lives in Oslo. Later Ann moved to Rome.\n")
    good = _results(tmp_path / "good.json", [{"query": "Where does Ann live?\nAnswer:", "answer": ["Rome"]}])
    with pytest.raises(MabImportError, match=re.escape(f"{plain}: no numbered facts")):
        import_mab_results(plain, good)
    no_size = _results(tmp_path / "nosize.json", [{"query": "Q?", "answer": ["a"]}], {"sub_dataset": "ruler_qa1_197K"})
    with pytest.raises(MabImportError, match="dataset_config.chunk_size' is missing.*data.chunk_tokens=N"):
        import_mab_results(plain, no_size)
    inst = import_mab_results(plain, no_size, chunk_tokens=5)  # not Conflict Resolution: no numbers needed
    assert inst.competency == "accurate_retrieval" and len(inst.chunks) == 2
    out = tmp_path / "fc.jsonl"
    assert main(["data", "import-mab-results", "--context", str(ctx), "--results", str(good), "--out", str(out),
                 "data.chunk_tokens=4"]) == 0
    assert "1 questions" in capsys.readouterr().out
    (inst,) = load_split(load_config(), out)
    assert inst.chunks == ["Here is a list of facts:", "0. Ann lives in Oslo.", "1. Ann lives in Rome."]


# ---- managers without a model ------------------------------------------------------------------------
def test_newest_context_cuts_the_oldest_end_at_sentences():
    chunks = ["One two. Three four.", "Five six. Seven eight.", "Nine ten."]
    assert [m.content for m in newest_context(chunks, 100)] == chunks
    kept = newest_context(chunks, 5)
    assert [m.id for m in kept] == ["c2", "c3"] and kept[0].content == "Seven eight." and kept[1].content == "Nine ten."
    assert newest_context(chunks, 1) == []  # the newest sentence alone does not fit: nothing, never a cut sentence


def _check_results(out: Path, n_questions: int) -> dict:
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) >= {"agent_config", "dataset_config", "data", "metrics", "time_cost", "averaged_metrics"}
    assert len(doc["data"]) == n_questions and [d["query_id"] for d in doc["data"]] == list(range(n_questions))
    for item in doc["data"]:
        assert list(item) == MAB_ITEM_KEYS
        assert isinstance(item["exact_match"], bool) and isinstance(item["substring_exact_match"], bool)
    for k in ("exact_match", "f1", "substring_exact_match"):
        assert len(doc["metrics"][k]) == n_questions
        assert doc["averaged_metrics"][k] == pytest.approx(100 * sum(doc["metrics"][k]) / n_questions)
    report = score_file(out / "results.json")  # `finemem score` recomputes every stored verdict
    assert len(report.items) == n_questions and not report.disagreeing
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    for short, k in (("EM", "exact_match"), ("F1", "f1"), ("SubEM", "substring_exact_match")):
        assert row[short] == pytest.approx(100 * sum(it.recomputed[k] for it in report.items) / n_questions)
    assert (out / "table.md").read_text().startswith("| manager |")
    return doc


@pytest.mark.parametrize("manager", ["rag", "long_context", "teacher"])
def test_no_model_managers_end_to_end(tmp_path, synth_file, manager, capsys):
    out = tmp_path / manager
    assert main(["eval", "--data", str(synth_file), "--out", str(out), f"eval.manager={manager}"]) == 0
    n = sum(len(i.questions) for i in load_split(load_config(), synth_file))
    doc = _check_results(out, n)
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    assert row["manager"] == manager and row["answerer_calls"] == n and row["manager_calls"] == 0
    assert row["per_source"]["synthetic"] == pytest.approx(row["SubEM"])  # synthetic is scored by SubEM
    if manager == "teacher":  # the ideal teacher keeps every asked fact: the evidence reader finds them
        assert row["steps"] > 0 and row["steps_not_prompted"] == 0 and row["valid_call_rate"] == 1.0
        assert row["invalid_reasons"] == {}
        assert row["SubEM"] > 90
    assert doc["agent_config"]["manager"] == manager
    assert doc["agent_config"]["manager_temperature"] is None  # no model writes these memories
    assert "overall score:" in capsys.readouterr().out


@needs_fc
def test_rag_on_shared_factconsolidation(tmp_path):
    data = tmp_path / "fc.jsonl"
    assert main(["data", "import-mab-results", "--context", str(FC / "factconsolidation_6k_context.txt"),
                 "--results", str(FC / "results_sh_6k.json"), "--out", str(data), "data.chunk_tokens=100"]) == 0
    out = tmp_path / "rag"
    assert main(["eval", "--data", str(data), "--out", str(out), "eval.manager=rag"]) == 0
    doc = _check_results(out, 100)
    assert doc["data"][0]["qa_pair_id"] == "factconsolidation_sh_6k_no0"
    assert doc["dataset_config"]["dataset"] == "Conflict_Resolution" and doc["dataset_config"]["chunk_size"] == 100


def test_teacher_needs_synthetic_data(tmp_path, capsys):
    path = _mab_parquet(tmp_path / "fc.parquet", "0. Ann lives in Oslo.", ["Where?"], [["Oslo"]],
                        "factconsolidation_sh_6k")
    assert main(["eval", "--data", str(path), "eval.manager=teacher"]) == 2
    line = _last_stderr_line(capsys)
    assert "metadata.chunk_facts' is missing; eval.manager=teacher" in line and str(path) in line


def test_policy_without_a_model_folder_stops_before_anything_starts(tmp_path, synth_file, capsys):
    assert main(["eval", "--data", str(synth_file), "--model", str(tmp_path / "nope")]) == 2
    assert _last_stderr_line(capsys).startswith(
        "finemem: config error: eval.manager=policy needs a model folder (--model DIR or model.path): "
        f"{tmp_path / 'nope'}: no such folder (a model folder is written by `finemem model init --out DIR`"
    )
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--data", str(synth_file), "--model", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: not a Hugging Face model folder, config.json missing" in _last_stderr_line(capsys)


def test_unknown_manager_fails_at_load():
    with pytest.raises(ConfigError, match="eval.manager='mem0': choose one of policy, openai, rag, long_context"):
        load_config(["eval.manager=mem0"])


# ---- the openai manager and answerer (local test server) --------------------------------------------
def _insert_call(content: str) -> str:
    return '<tool_call>{"name": "memory_insert", "arguments": {"content": ' + json.dumps(content) + "}}</tool_call>"


def _manager_handler(server: OpenAITestServer):
    """Manager prompts (system prompt with the tool list): insert every line of the chunk; else the rule model."""

    def handle(body):
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if "Tools:" not in system:
            return server.model.reply(body)
        chunk = user.split("\nChunk ", 1)[1].split("\n", 1)[1]
        return "\n".join(_insert_call(line) for line in chunk.splitlines() if line.strip())

    return handle


def test_openai_manager_and_answerer_end_to_end(tmp_path, synth_file, capsys):
    with OpenAITestServer() as server:
        server.handler = _manager_handler(server)
        out = tmp_path / "openai"
        rc = main(["eval", "--data", str(synth_file), "--out", str(out), "--samples", "2", "eval.manager=openai",
                   f"eval.endpoint.base_url={server.base_url}", "eval.endpoint.model=test-model",
                   "reward.answerer.kind=openai", f"reward.answerer.base_url={server.base_url}",
                   "reward.answerer.model=test-model"])
        assert rc == 0, capsys.readouterr().err
        instances = load_split(load_config(), synth_file)
        steps = 2 * sum(i.num_steps for i in instances)
        n = 2 * sum(len(i.questions) for i in instances)
        manager_requests = [r for r in server.requests if "Tools:" in r["messages"][0]["content"]]
        answer_requests = [r for r in server.requests if "Tools:" not in r["messages"][0]["content"]]
    assert len(manager_requests) == steps and len(answer_requests) == n  # every question went to the server
    assert all("Facts may conflict" in r["messages"][0]["content"] for r in answer_requests)  # synthetic: CR
    doc = _check_results(out, n)
    (row,) = json.loads((out / "table.json").read_text())["rows"]
    assert row["manager_calls"] == steps and row["answerer_calls"] == n and row["valid_call_rate"] == 1.0
    assert row["steps"] == steps and row["steps_not_prompted"] == 0
    # the manager stored every line; the rule model answers with the line sharing most words with the question
    assert row["SubEM"] > 30 and row["per_source"]["synthetic"] == pytest.approx(row["SubEM"])
    assert doc["data"][0]["qa_pair_id"].endswith("_no0_s0") and doc["data"][1]["qa_pair_id"].endswith("_no1_s0")


def test_endpoint_that_does_not_serve_the_model_is_one_line(tmp_path, synth_file, capsys):
    with OpenAITestServer() as server:
        rc = main(["eval", "--data", str(synth_file), "eval.manager=openai", f"eval.endpoint.base_url={server.base_url}",
                   "eval.endpoint.model=Qwen/Qwen3-32B"])
        assert not server.requests  # nothing was asked
    assert rc == 2
    assert _last_stderr_line(capsys) == (f"finemem: config error: eval.endpoint.model=Qwen/Qwen3-32B: {server.base_url} "
                                         "does not serve it (it serves: test-model); set eval.endpoint.model to one "
                                         "of those")
    rc = main(["eval", "--data", str(synth_file), "eval.manager=rag", "reward.answerer.kind=openai",
               f"reward.answerer.base_url={server.base_url}"])  # the server is stopped now
    assert rc == 2
    assert f"reward.answerer.base_url={server.base_url}: no OpenAI-compatible server answers there" in \
        _last_stderr_line(capsys)


class _SmallContextClient:
    """A chat client whose model has a small context: prompts over `limit` characters are refused as vLLM does."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.windows: list[int] = []
        self.sent = 0

    async def chat_reply(self, messages, *, episode_id=None):
        text = messages[-1]["content"]
        self.windows.append(text.count("\n[m"))
        if len(text) > self.limit:
            raise AnswererError("HTTP 400 from http://x/v1: {\"error\": {\"message\": \"This model's maximum "
                                "context length is 2048 tokens. However, you requested 2300 tokens\"}}", episode_id)
        self.sent += 1
        line = text.split("\nChunk ", 1)[1].splitlines()[1]
        return ChatReply(_insert_call(line), "stop")

    async def close(self):
        return None


def test_openai_manager_shrinks_the_window_then_records_prompt_too_long():
    cfg = load_config(["memory.window=8"])
    chunks = [f"Fact number {i} is here." for i in range(6)] + ["x " * 400]
    inst = Instance("i", chunks, [QAPair("Which fact?", ["Fact number 5"])])
    client = _SmallContextClient(limit=230)
    (built,) = build_openai([inst], cfg, 1, client=client)
    steps = built.episode.steps
    assert [s.finish_reason for s in steps] == ["stop"] * 6 + ["prompt_too_long"]
    assert steps[-1].ops[0].op == "invalid" and "even with no memory shown" in steps[-1].ops[0].reason
    assert min(client.windows[:-1]) < 5 <= max(client.windows)  # the window was halved, not dropped at once
    assert len(built.items) == 6 and built.manager_calls == len(client.windows)


def test_openai_manager_counts_a_cut_reply_as_invalid():
    class Cut(_SmallContextClient):
        async def chat_reply(self, messages, *, episode_id=None):
            return ChatReply('<tool_call>{"name": "memory_insert", "arguments": {"content": "a"}}</tool_call>\n'
                             '<tool_call>{"name": "memory_ins', "length")

    cfg = load_config()
    episode = __import__("asyncio").run(OpenAIManager(cfg, Cut(10**6)).run_episode(
        Instance("i", ["a chunk"], [QAPair("q", ["a"])]), "e"))
    ops = episode.steps[0].ops
    assert [o.valid for o in ops] == [True, False] and episode.final_memory[0].content == "a"


# ---- tables, warnings, --compare ---------------------------------------------------------------------
def test_prompt_too_long_is_loud():
    row = {"label": "policy (sft-model)", "steps": 90, "steps_not_prompted": 90, "questions": 100,
           "answers_not_prompted": 0}
    text = not_prompted_warning(row)
    assert text.startswith("WARNING: policy (sft-model): 90 of 90 manager steps (100%) were not prompted")
    assert "data.chunk_tokens=100" in text and "almost empty memory" in text
    assert not_prompted_warning({**row, "steps_not_prompted": 0}) is None
    assert not_prompted_warning({**row, "steps_not_prompted": 3}).startswith("warning: ")


def test_table_marks_unprompted_steps(tmp_path):
    from finemem.benchmark import RunStats, table_markdown, table_row

    q = QuestionResult("i", "synthetic", "conflict_resolution", 0, "q", ["a"], "a", 1.0, "i_no0")
    row = table_row(RunStats("policy", "policy (m)", steps=10, steps_not_prompted=9), [q],
                    results_doc([q], {})["averaged_metrics"])
    md = table_markdown([row])
    assert "**9 of 10**" in md and "WARNING: policy (m): 9 of 10 manager steps (90%)" in md


def test_icl_results_score_the_parsed_answer_as_finemem_score_does(tmp_path):
    q = QuestionResult("i", "icl_banking77_5900shot_balance", "test_time_learning", 0, "q", ["7"],
                       "label: 3\n7", 0.0, "i_no0")
    doc = results_doc([q], {})
    assert doc["data"][0]["substring_exact_match"] is False  # the raw output contains 7; the parsed one does not
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert not score_file(tmp_path / "r.json").disagreeing


def test_compare_merges_folders(tmp_path, synth_file, capsys):
    for m in ("rag", "teacher"):
        assert main(["eval", "--data", str(synth_file), "--out", str(tmp_path / m), f"eval.manager={m}"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "rag"), str(tmp_path / "teacher"), "--out",
                 str(tmp_path / "both")]) == 0
    md = capsys.readouterr().out
    assert md.splitlines()[0].startswith("| manager | synthetic |")
    assert [ln.split("|")[1].strip() for ln in md.splitlines()[2:4]] == ["rag (top-2)", "teacher"]
    rows = json.loads((tmp_path / "both" / "table.json").read_text())["rows"]
    assert [r["manager"] for r in rows] == ["rag", "teacher"]
    assert main(["eval", "--compare", str(tmp_path / "rag"), str(tmp_path / "nothing")]) == 2
    assert _last_stderr_line(capsys) == f"finemem eval --compare: {tmp_path / 'nothing'}: no table.json (is it a " \
                                        "`finemem eval --out` folder?)"


def test_answer_prompt_states_the_conflict_rule():
    ev = [MemoryItem("m1", "0. Ann lives in Oslo.", 1), MemoryItem("m2", "1. Ann lives in Rome.", 2)]
    system = answer_messages("Where does Ann live?", ev, "conflict_resolution")[0]["content"]
    assert "the larger serial number is the newer fact" in system
    assert answer_messages("q", ev)[0]["content"] == answer_messages("q", ev, None)[0]["content"]
    assert "larger serial" not in answer_messages("q", ev, "accurate_retrieval")[0]["content"]
    with pytest.raises(ValueError, match="unknown competency"):
        answer_messages("q", ev, "nonsense")


def test_prompt_too_long_replies_are_recognised():
    from learner.managers import is_prompt_too_long

    vllm = ("HTTP 400 from http://h/v1: {\"error\":{\"message\":\"This model's maximum context length is 2048 tokens. "
            "However, your request has 2100 input tokens. Please reduce the length of the input messages.\"}}")
    assert is_prompt_too_long(AnswererError(vllm))
    assert is_prompt_too_long(AnswererError("HTTP 400 from u: 'max_tokens' or 'max_completion_tokens' is too large"))
    assert not is_prompt_too_long(AnswererError("HTTP 401 from u: invalid api key"))
    assert not is_prompt_too_long(AnswererError("HTTP 400 from u: unknown field 'foo'"))


def test_answers_that_do_not_fit_the_answerer_are_counted_and_loud():
    import asyncio

    from learner.harness import _Answering
    from learner.managers import build_long_context

    class SmallAnswerer:
        is_llm = True

        async def chat(self, messages, *, episode_id=None):
            if len(messages[-1]["content"]) > 200:
                raise AnswererError("HTTP 400 from u: This model's maximum context length is 2048 tokens", episode_id)
            return "Rome"

        async def close(self):
            return None

    cfg = load_config(["eval.context_tokens=1000"])
    short = Instance("s", ["Ann lives in Rome."], [QAPair("Where does Ann live?", ["Rome"])])
    long = Instance("l", ["Ann lives in Rome. " * 40], [QAPair("Where does Ann live?", ["Rome"])])
    answering = _Answering(cfg, SmallAnswerer())
    results = asyncio.run(answering.all(build_long_context([short, long], cfg), 1))
    assert [r.output for r in results] == ["Rome", ""] and [r.score for r in results] == [1.0, 0.0]
    assert answering.calls == 2 and answering.not_prompted == 1
    row = {"label": "long_context", "steps": 0, "steps_not_prompted": 0, "questions": 2, "answers_not_prompted": 1}
    assert not_prompted_warning(row).startswith("WARNING: long_context: 1 of 2 questions got no answer")
