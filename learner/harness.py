"""`finemem eval`: benchmark one memory manager on Memalpha, MemoryAgentBench or synthetic data.

    finemem eval --data FILE [--model DIR] [--out DIR] [--name LABEL] eval.manager=policy|openai|rag|long_context|teacher
    finemem eval --compare DIR1 DIR2 ... [--out DIR]

A run: check the inputs (data file and format, model folder, endpoints) before anything starts; let
the manager (learner.managers) build a memory per instance (and sample); answer EVERY question of
the instance from it with the answerer (`reward.answerer`: the evidence reader on CPU, or an
OpenAI-compatible model with the benchmark's answer instruction per competency, e.g. the Conflict
Resolution rule); score each answer with its source's metric and MemoryAgentBench's EM / F1 / SubEM.

With `--out DIR` it writes `results.json` (MemoryAgentBench's results format: `finemem score` and the
benchmark's tools read it), `table.json` and `table.md` (one row: scores per source and competency,
memory tokens, answerer and manager calls, wall time, unprompted steps). `--compare` merges the rows
of several such folders into one table. A run whose manager could not be prompted for some steps
(chunk plus memory longer than its context) says so in a WARNING line and in the table.

The data format comes from the file (as `finemem data inspect`); `data.format=` on the command line
must then match it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finemem.benchmark import (
    QuestionResult,
    RunStats,
    not_prompted_warning,
    results_doc,
    table_markdown,
    table_row,
    write_table,
)
from finemem.config import ConfigError
from finemem.records import Instance
from learner.managers import EVIDENCE_BM25, BuiltMemory


def check_endpoint(endpoint_cfg, key: str, timeout_s: float = 10.0) -> None:
    """Stop with one line when nothing answers at `{key}.base_url` or it does not serve `{key}.model`.

    A server without `/models` (some hosted APIs) is not refused here: its first request says more.
    """
    import os
    import urllib.error
    import urllib.request

    base = str(endpoint_cfg.base_url).rstrip("/")
    headers = {}
    key_env = str(endpoint_cfg.api_key_env or "")
    if key_env and os.environ.get(key_env):
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}/models", headers=headers),
                                    timeout=timeout_s) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"{key}.base_url={base}: no OpenAI-compatible server answers there ({reason})") from None
    served = [m.get("id") for m in (data.get("data") or []) if isinstance(m, dict)] if isinstance(data, dict) else []
    if served and str(endpoint_cfg.model) not in served:
        raise ConfigError(f"{key}.model={endpoint_cfg.model}: {base} does not serve it (it serves: "
                          f"{', '.join(map(str, served))}); set {key}.model to one of those")


def preflight(cfg) -> None:
    """The checks that need no data: model folder, endpoints, answerer kind."""
    from learner.managers import check_model_folder
    from reward.answerers import make_answerer

    manager = str(cfg.eval.manager)
    if manager == "policy":
        check_model_folder(str(cfg.model.path))
    if manager == "openai":
        check_endpoint(cfg.eval.endpoint, "eval.endpoint")
    make_answerer(cfg.reward.answerer)  # an unknown kind fails here, naming the key
    if str(cfg.reward.answerer.kind) == "openai":
        check_endpoint(cfg.reward.answerer, "reward.answerer")


def default_label(cfg) -> str:
    manager = str(cfg.eval.manager)
    if manager == "policy":
        return f"policy ({Path(str(cfg.model.path)).name})"
    if manager == "openai":
        return f"openai ({cfg.eval.endpoint.model})"
    if manager == "rag":
        return f"rag (top-{int(cfg.eval.rag_top_k) or int(cfg.retrieval.top_k)})"
    if manager == "long_context":
        return f"long_context ({int(cfg.eval.context_tokens)} words)"
    return manager


def build(cfg, instances: Sequence[Instance], samples: int) -> list[BuiltMemory]:
    from learner import managers

    manager = str(cfg.eval.manager)
    if manager == "rag":
        return managers.build_rag(instances, cfg)
    if manager == "long_context":
        return managers.build_long_context(instances, cfg)
    if manager == "teacher":
        return managers.build_teacher(instances, cfg)
    if manager == "openai":
        return managers.build_openai(instances, cfg, samples)
    return managers.build_policy(instances, cfg, samples)


def qa_pair_id(inst: Instance, j: int, sample: int, samples: int) -> str:
    """The benchmark's id of question j (an imported instance keeps MAB's), per sample when several."""
    ids = inst.metadata.get("qa_pair_ids")
    base = str(ids[j]) if isinstance(ids, list) and len(ids) == len(inst.questions) else f"{inst.instance_id}_no{j}"
    return f"{base}_s{sample}" if samples > 1 else base


class _Answering:
    """Answers every question of every built memory, counting calls and prompts that did not fit."""

    def __init__(self, cfg, answerer) -> None:
        self.cfg = cfg
        self.answerer = answerer
        self.calls = 0
        self.not_prompted = 0

    async def ask(self, question: str, evidence: list, competency: str, episode_id: str) -> str:
        from learner.managers import is_prompt_too_long
        from reward.answerers import AnswererError, answer_messages

        self.calls += 1
        if not hasattr(self.answerer, "chat"):  # the evidence reader
            return await self.answerer.answer(question, evidence, episode_id=episode_id)
        try:
            return await self.answerer.chat(answer_messages(question, evidence, competency), episode_id=episode_id)
        except AnswererError as err:
            if not is_prompt_too_long(err):
                raise
            self.not_prompted += 1
            return ""

    async def one(self, b: BuiltMemory, index, j: int, samples: int) -> QuestionResult:
        from finemem.scoring import metric_for_source, score_answer
        from reward.answerers import format_evidence

        inst = b.instance
        qa = inst.questions[j]
        evidence = [m for m, _ in index.search(qa.question, b.top_k)] if index is not None else list(b.items)
        eid = f"{inst.instance_id}-s{b.sample}-q{j}"
        t0 = time.perf_counter()
        output = await self.ask(qa.question, evidence, inst.competency, eid)
        query_s = time.perf_counter() - t0
        metric = str(self.cfg.reward.metric)
        name = metric_for_source(inst.data_source) if metric == "auto" else metric
        if name == "llm_judge":
            self.calls += 1
            score = float(bool(await self.answerer.judge(qa.question, output, qa.answers, episode_id=eid)))
        else:
            score = score_answer(output, qa.answers, inst.data_source, metric=metric, question=qa.question)
        return QuestionResult(
            instance_id=inst.instance_id, data_source=inst.data_source, competency=inst.competency,
            sample=b.sample, question=qa.question, golds=list(qa.answers), output=output, score=score,
            qa_pair_id=qa_pair_id(inst, j, b.sample, samples),
            input_len=len(qa.question.split()) + len(format_evidence(evidence).split()),
            query_time_s=query_s, memory_construction_s=b.construction_s, evidence_ids=[m.id for m in evidence])

    async def all(self, built: Sequence[BuiltMemory], samples: int) -> list[QuestionResult]:
        from finemem.retrieval import BM25Index

        jobs = []
        for b in built:
            index = BM25Index(b.items) if b.evidence == EVIDENCE_BM25 else None
            jobs += [self.one(b, index, j, samples) for j in range(len(b.instance.questions))]
        try:
            return list(await asyncio.gather(*jobs))
        finally:
            await self.answerer.close()


def run_stats(cfg, label: str, built: Sequence[BuiltMemory]) -> RunStats:
    from finemem.train_metrics import invalid_reasons, op_mix
    from rollout.episode import FINISH_PROMPT_TOO_LONG

    episodes = [b.episode for b in built if b.episode is not None]
    manager = str(cfg.eval.manager)
    model = {"policy": str(cfg.model.path), "openai": str(cfg.eval.endpoint.model)}.get(manager, "")
    n = max(1, len(built))
    return RunStats(
        manager=manager, label=label, model=model, memories=len(built),
        memory_tokens=sum(b.memory_tokens for b in built) / n, memory_items=sum(len(b.items) for b in built) / n,
        steps=sum(len(ep.steps) for ep in episodes),
        steps_not_prompted=sum(s.finish_reason == FINISH_PROMPT_TOO_LONG for ep in episodes for s in ep.steps),
        valid_call_rate=op_mix(episodes)["ops/valid_call_rate"] if episodes else None,
        invalid_reasons=invalid_reasons(episodes),
        manager_calls=sum(b.manager_calls for b in built),
    )


def run_eval(cfg, out_dir: str | None = None, label: str | None = None) -> dict[str, Any]:
    """One benchmark run as the config says; returns {"row", "results", "warning"} and writes `out_dir`."""
    from finemem.data.splits import load_split
    from learner.managers import check_teacher_data
    from reward.answerers import make_answerer

    t_start = time.perf_counter()
    preflight(cfg)
    path = str(cfg.data.eval_path)
    instances = load_split(cfg, path, int(cfg.eval.instances) or None)
    manager = str(cfg.eval.manager)
    if manager == "teacher":
        check_teacher_data(instances, path)
    samples = max(1, int(cfg.eval.samples_per_instance)) if manager in ("policy", "openai") else 1
    label = label or default_label(cfg)

    t0 = time.perf_counter()
    built = build(cfg, instances, samples)
    manager_s = time.perf_counter() - t0
    answering = _Answering(cfg, make_answerer(cfg.reward.answerer))
    t1 = time.perf_counter()
    questions = asyncio.run(answering.all(built, samples))
    answer_s = time.perf_counter() - t1

    stats = run_stats(cfg, label, built)
    stats.answerer_calls, stats.answers_not_prompted = answering.calls, answering.not_prompted
    stats.manager_s, stats.answer_s, stats.wall_s = manager_s, answer_s, time.perf_counter() - t_start
    answerer = cfg.reward.answerer
    # "temperature" is the answerer's, as in MemoryAgentBench's files; a sampling manager's own
    # temperature is "manager_temperature" (None where no model writes the memory)
    manager_temperature = {"policy": cfg.eval.temperature, "openai": cfg.eval.endpoint.temperature}.get(manager)
    agent_config = {
        "agent_name": f"finemem_{manager}", "manager": manager, "label": label, "model": stats.model,
        "answerer": "evidence reader" if str(answerer.kind) == "evidence" else str(answerer.model),
        "temperature": float(answerer.temperature), "retrieval_top_k": int(cfg.retrieval.top_k),
        "manager_temperature": None if manager_temperature is None else float(manager_temperature),
        "samples_per_instance": samples,
    }
    chunk_sizes = sorted({int(i.metadata.get("chunk_tokens") or cfg.data.chunk_tokens) for i in instances})
    dataset_config = {"chunk_size": chunk_sizes[0] if len(chunk_sizes) == 1 else chunk_sizes, "data_path": path,
                      "instances": len(instances)}
    doc = results_doc(questions, agent_config, dataset_config)
    row = table_row(stats, questions, doc["averaged_metrics"])
    row["answerer"] = agent_config["answerer"]
    row["data"] = path
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False))
        write_table(out, [row])
    return {"row": row, "results": doc, "warning": not_prompted_warning(row)}


def compare(dirs: Sequence[str], out_dir: str | None) -> int:
    from finemem.benchmark import CompareError, merge_rows

    try:
        rows = merge_rows(dirs)
    except CompareError as e:
        print(f"finemem eval --compare: {e}", file=sys.stderr)
        return 2
    if out_dir:
        write_table(out_dir, rows)
    print(table_markdown(rows), end="")
    return 0


def cli(argv: list[str]) -> int:
    """`finemem eval --data FILE [--model DIR] [--samples N] [--out DIR] [--name LABEL] [key=value ...]`
    or `finemem eval --compare DIR1 DIR2 ... [--out DIR]`."""
    from finemem.cli import parse_command
    from finemem.config import load_config

    parser = argparse.ArgumentParser(prog="finemem eval", description=cli.__doc__)
    parser.add_argument("--data", default=None, help="jsonl, Memalpha parquet or MemoryAgentBench parquet")
    parser.add_argument("--model", default=None, help="eval.manager=policy: the policy's Hugging Face folder")
    parser.add_argument("--samples", type=int, default=None, help="episodes per instance (policy, openai)")
    parser.add_argument("--out", default=None, help="write results.json, table.json and table.md here")
    parser.add_argument("--name", default=None, help="the row's label in the table")
    parser.add_argument("--compare", nargs="+", default=None, metavar="DIR", help="merge result folders")
    args, overrides = parse_command(parser, argv)
    if args.compare:
        return compare(args.compare, args.out)
    if not args.data:
        parser.error("--data FILE is required (or --compare DIR ...)")
    cfg = load_config(overrides)
    if args.model:
        cfg.model.path = args.model
    cfg.data.eval_path = args.data
    if not any(o.startswith("data.format=") for o in overrides):
        cfg.data.format = "auto"  # detected from the file; an explicit data.format must match it
    if args.samples:
        cfg.eval.samples_per_instance = args.samples
    result = run_eval(cfg, args.out, args.name)
    print(table_markdown([result["row"]], warnings=False), end="")
    if args.out:
        print(f"finemem eval: wrote {Path(args.out) / 'results.json'}, table.md, table.json")
    print(f"overall score: {result['row']['overall']:.1f}", flush=True)
    if result["warning"]:  # the last word: the scores above mean little
        print(result["warning"], file=sys.stderr)
    return 0
