"""What `finemem eval` writes: MemoryAgentBench-format results, and the one-row-per-manager table.

Pure functions over per-question records, so the files can be checked without any engine:

- `results_doc`: MemoryAgentBench's results format (`main.py`'s `save_results_to_file`): per question
  `output`, `parsed_output`, `exact_match`, `f1`, `substring_exact_match`, `answer`, `query`,
  `query_id`, `qa_pair_id` (and lengths and times), per-item `metrics` lists, cumulative
  `time_cost`, and `averaged_metrics` with the scores x100. `finemem score results.json` recomputes
  the same numbers (one rule for every item: the parsed answer alone for an icl `sub_dataset`, as
  `finemem score` and MAB do).
- `table_row`: per data source and competency the source's own metric (`scoring.metric_for_source`;
  for MAB sources that is SubEM), MAB's EM / F1 / SubEM over all questions (= `averaged_metrics`),
  memory size, answerer and manager calls, wall time, and the steps the manager could not be
  prompted for (prompt too long), all x100 where a score.
- `table_markdown` / `merge_rows`: the table, and several result folders merged (`--compare`).

Memory sizes are whitespace words for every manager (ours): a tokenizer-free count compares a tiny
policy, a served model and the no-manager baselines on one scale.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemem.records import COMPETENCIES
from finemem.scoring import MAB_METRICS, mab_scores, parse_output, summarize_scores

# MemoryAgentBench's dataset (split) name of each competency.
MAB_DATASETS = {
    "accurate_retrieval": "Accurate_Retrieval",
    "test_time_learning": "Test_Time_Learning",
    "long_range_understanding": "Long_Range_Understanding",
    "conflict_resolution": "Conflict_Resolution",
}
SHORT = {"exact_match": "EM", "f1": "F1", "substring_exact_match": "SubEM"}
# Above this share of manager steps that could not be prompted, the summary says the scores mean little.
NOT_PROMPTED_LOUD = 0.5


@dataclass
class QuestionResult:
    """One answered question: what was asked, what the answerer said, and its source-metric score."""

    instance_id: str
    data_source: str
    competency: str
    sample: int
    question: str
    golds: list[str]
    output: str
    score: float  # the data source's metric (scoring.score_answer), in [0, 1]
    qa_pair_id: str
    input_len: int = 0  # words of the answer prompt (question and evidence)
    query_time_s: float = 0.0
    memory_construction_s: float = 0.0  # the manager's time for this question's instance and sample
    evidence_ids: list[str] = field(default_factory=list)


@dataclass
class RunStats:
    """What one manager did, besides the answers (means over the built memories)."""

    manager: str
    label: str
    model: str = ""
    memories: int = 0  # (instance, sample) memories built
    memory_tokens: float = 0.0  # whitespace words of the memory the answerer searches
    memory_items: float = 0.0
    steps: int = 0  # manager steps (0 for rag / long_context)
    steps_not_prompted: int = 0  # steps whose prompt did not fit the manager's context
    valid_call_rate: float | None = None
    invalid_reasons: dict[str, int] = field(default_factory=dict)  # refused calls by kind (managers with calls)
    manager_calls: int = 0
    answerer_calls: int = 0
    answers_not_prompted: int = 0  # questions whose answer prompt did not fit the answerer's context
    manager_s: float = 0.0
    answer_s: float = 0.0
    wall_s: float = 0.0

    @property
    def not_prompted_share(self) -> float:
        return self.steps_not_prompted / self.steps if self.steps else 0.0


def icl_file(sub_dataset: str) -> bool:
    """MAB scores the parsed answer alone for its icl sources (`finemem score` reads sub_dataset)."""
    return "icl" in sub_dataset.lower()


def sub_dataset_name(questions: Sequence[QuestionResult]) -> str:
    """The results file's `sub_dataset`: the one source, or the sources joined by '+'."""
    return "+".join(sorted({q.data_source for q in questions}))


def results_doc(questions: Sequence[QuestionResult], agent_config: dict[str, Any],
                dataset_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A MemoryAgentBench results document over `questions` (in order; query_id is the position)."""
    sub = sub_dataset_name(questions)
    parsed_only = icl_file(sub)
    competencies = sorted({q.competency for q in questions})
    config = {"dataset": "+".join(MAB_DATASETS.get(c, c) for c in competencies), "sub_dataset": sub}
    config.update(dataset_config or {})
    config["sub_dataset"] = sub  # what `finemem score` reads to choose the icl rule
    data = []
    clock = 0.0
    time_cost = []
    for i, q in enumerate(questions):
        scores = mab_scores(q.output, q.golds, parsed_only=parsed_only)
        data.append({
            "output": q.output,
            "input_len": q.input_len,
            "output_len": len(q.output.split()),
            "memory_construction_time": q.memory_construction_s,
            "query_time_len": q.query_time_s,
            "parsed_output": parse_output(q.output),
            "exact_match": bool(scores["exact_match"]),
            "f1": scores["f1"],
            "substring_exact_match": bool(scores["substring_exact_match"]),
            "answer": list(q.golds),
            "query": q.question,
            "query_id": i,
            "qa_pair_id": q.qa_pair_id,
        })
        clock += q.query_time_s
        time_cost.append(clock)
    keys = (*MAB_METRICS, "input_len", "output_len", "memory_construction_time", "query_time_len")
    metrics = {k: [float(d[k]) for d in data] for k in keys}
    averaged = {k: (100.0 if k in MAB_METRICS else 1.0) * _mean(v) for k, v in metrics.items()}
    return {"agent_config": agent_config, "dataset_config": config, "data": data, "metrics": metrics,
            "time_cost": time_cost, "averaged_metrics": averaged}


def table_row(stats: RunStats, questions: Sequence[QuestionResult], averaged: dict[str, float]) -> dict[str, Any]:
    """One row of the table: scores x100 per source and competency, MAB metrics, sizes, calls, times."""
    by = summarize_scores([{"data_source": q.data_source, "competency": q.competency, "score": q.score}
                           for q in questions]) if questions else {"per_source": {}, "per_competency": {},
                                                                     "overall": {"mean": 0.0, "n": 0}}
    return {
        "manager": stats.manager,
        "label": stats.label,
        "model": stats.model,
        "questions": len(questions),
        "per_source": {s: 100.0 * e["mean"] for s, e in by["per_source"].items()},
        "per_competency": {c: 100.0 * e["mean"] for c, e in by["per_competency"].items()},
        "overall": 100.0 * by["overall"]["mean"],
        **{SHORT[k]: float(averaged.get(k, 0.0)) for k in MAB_METRICS},
        "memory_tokens": stats.memory_tokens,
        "memory_items": stats.memory_items,
        "answerer_calls": stats.answerer_calls,
        "manager_calls": stats.manager_calls,
        "wall_s": stats.wall_s,
        "manager_s": stats.manager_s,
        "answer_s": stats.answer_s,
        "steps": stats.steps,
        "steps_not_prompted": stats.steps_not_prompted,
        "answers_not_prompted": stats.answers_not_prompted,
        "valid_call_rate": stats.valid_call_rate,
        "invalid_reasons": stats.invalid_reasons,
    }


def not_prompted_warning(row: dict[str, Any]) -> str | None:
    """A loud line when manager steps (or answers) were skipped because their prompt was too long."""
    lines = []
    steps, skipped = int(row.get("steps") or 0), int(row.get("steps_not_prompted") or 0)
    if skipped:
        share = skipped / steps if steps else 1.0
        head = "WARNING" if share >= NOT_PROMPTED_LOUD else "warning"
        lines.append(
            f"{head}: {row['label']}: {skipped} of {steps} manager steps ({100 * share:.0f}%) were not prompted: "
            "the prompt did not fit the manager's context (chunk plus memory); "
            + ("the scores measure an almost empty memory. " if share >= NOT_PROMPTED_LOUD else "")
            + "Lower data.chunk_tokens (e.g. data.chunk_tokens=100) or raise model.max_model_len")
    if int(row.get("answers_not_prompted") or 0):
        lines.append(f"WARNING: {row['label']}: {row['answers_not_prompted']} of {row['questions']} questions got no "
                     "answer: the answer prompt did not fit the answerer's context; lower eval.context_tokens, "
                     "eval.rag_top_k or data.chunk_tokens")
    return "\n".join(lines) or None


def _columns(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    sources = sorted({s for r in rows for s in r["per_source"]})
    comps = [c for c in COMPETENCIES if any(c in r["per_competency"] for r in rows)]
    return sources, comps


def table_markdown(rows: Sequence[dict[str, Any]], warnings: bool = True) -> str:
    """The table as markdown: one row per manager; scores x100; a mark on rows with unprompted steps,
    and (`warnings`) their WARNING lines under it."""
    sources, comps = _columns(rows)
    head = (["manager", *sources, *comps, "EM", "F1", "SubEM", "memory tokens", "answerer calls", "manager calls",
             "wall s", "steps not prompted"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["label"]]
        cells += [_score(r["per_source"].get(s)) for s in sources]
        cells += [_score(r["per_competency"].get(c)) for c in comps]
        cells += [_score(r[k]) for k in ("EM", "F1", "SubEM")]
        cells += [f"{r['memory_tokens']:.1f}", str(r["answerer_calls"]), str(r["manager_calls"]), f"{r['wall_s']:.1f}"]
        skipped = int(r.get("steps_not_prompted") or 0)
        cells.append(f"**{skipped} of {r['steps']}**" if skipped else (f"0 of {r['steps']}" if r["steps"] else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [w for w in (not_prompted_warning(r) for r in rows) if w] if warnings else []
    lines.append("")
    lines.append("Scores x100: per source its own metric (SubEM for MemoryAgentBench sources), per competency the "
                 "mean of its sources; EM / F1 / SubEM are MemoryAgentBench's over all questions. Memory tokens are "
                 "whitespace words.")
    lines += [f"\n{n}" for n in notes]
    return "\n".join(lines) + "\n"


def _score(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def write_table(out_dir: str | Path, rows: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """table.json ({"rows": [...]}) and table.md in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"rows": list(rows)}, indent=2))
    (out / "table.md").write_text(table_markdown(rows))
    return out / "table.json", out / "table.md"


class CompareError(ValueError):
    """A result folder that `--compare` cannot read; the message names the folder and file."""


def read_rows(result_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of one result folder's table.json."""
    path = Path(result_dir) / "table.json"
    if not path.is_file():
        raise CompareError(f"{result_dir}: no table.json (is it a `finemem eval --out` folder?)")
    try:
        rows = json.loads(path.read_text()).get("rows")
    except (ValueError, AttributeError) as e:
        raise CompareError(f"{path}: not a table.json written by finemem eval ({e})") from None
    required = ("label", "per_source", "per_competency", "EM", "F1", "SubEM", "memory_tokens", "answerer_calls",
                "manager_calls", "wall_s", "steps")
    if not isinstance(rows, list) or not rows:
        raise CompareError(f"{path}: field 'rows' is missing or empty")
    for i, row in enumerate(rows):
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise CompareError(f"{path}: rows[{i}]: missing field(s) {', '.join(missing)}")
    return rows


def merge_rows(result_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The rows of several result folders, in the order given (each labelled as it was written)."""
    return [row for d in result_dirs for row in read_rows(d)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
