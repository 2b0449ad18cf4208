"""Answer scoring for every data source of spec section 5, and `finemem score`.

Two families of metrics live here, each reproducing the scorer its numbers are compared with:

- MemoryAgentBench (MAB) text metrics, as in MAB's `utils/eval_other_utils.py`
  (`normalize_answer`, `f1_score`, `parse_output`, `calculate_metrics`, `default_post_process`):
  exact match, token F1 and substring exact match on SQuAD-normalised text, max over gold
  aliases, computed on the raw output and on the parsed answer, keeping the max of the two.
  Checked item by item against official result files in `../shared/data` (tests/test_scoring.py).
- Memalpha's per-source scores, as in Mem-alpha's `evaluate_agent_results.py` /
  `long_context_eval.py`: lowercase containment (squad, hotpotqa), `;`-part recall (perltqa),
  keyword recall (booksum, infbench_sum), a digit label in `\\boxed{...}` (pubmed-rct, icl_*),
  and an LLM yes/no judge (lme_train, longmemeval).

`metric_for_source` picks the metric of a source; `score_answer` dispatches. Every metric returns
a float in [0, 1]. Choices that are ours are marked "(ours)" in the docstrings.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemem.records import COMPETENCIES

Judge = Callable[[str, str, list[str]], bool]
"""An LLM yes/no judge: (question, prediction, golds) -> is the prediction correct."""

ANSWER_PREFIX = "Answer:"
MAB_METRICS = ("exact_match", "f1", "substring_exact_match")
METRICS = (
    "exact_match",  # MAB normalised exact match (max over raw / parsed output)
    "f1",  # MAB token F1
    "substring_exact_match",  # MAB normalised gold-in-prediction
    "substring",  # Memalpha: lowercased gold is a substring of the lowercased prediction
    "part_recall",  # Memalpha perltqa: fraction of `;`-separated gold parts found
    "keyword_recall",  # Memalpha booksum / infbench_sum: fraction of gold keywords found
    "boxed_label",  # Memalpha classification: the extracted label must be the gold digit label
    "llm_judge",  # Memalpha lme_train / longmemeval: an LLM yes/no judge
    "eventqa_recall",  # MAB eventqa: 1 iff every gold element is in the prediction
    "ruler_recall",  # MAB ruler_niah: fraction of gold elements in the prediction
)


# ---------------------------------------------------------------------------------------------
# MemoryAgentBench text metrics
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation in MAB's order: lowercase, drop ASCII punctuation, drop a/an/the,
    collapse whitespace. Punctuation goes before articles, so "the-end" -> "theend" keeps "the"."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def substring_exact_match(prediction: str, gold: str) -> bool:
    """Normalised gold is contained in the normalised prediction (plain substring, not words)."""
    return normalize_answer(gold) in normalize_answer(prediction)


def token_f1(prediction: str, gold: str) -> float:
    """Token F1 on normalised text; if either side normalises to yes/no/noanswer and the two
    differ, the score is 0 (so "yes it is" vs "yes" scores 0, as in MAB/SQuAD-v2)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def parse_output(output: str, answer_prefix: str = ANSWER_PREFIX) -> str:
    """MAB's answer extraction: the rest of the line after the first `answer_prefix`
    (case-insensitive), else the first line; stripped, and a repeated leading prefix removed.

    MAB returns None only when no pattern matches, which cannot happen (the first-line pattern
    matches any string), so this always returns a string, possibly empty.
    """
    match = re.search(f"(?:{re.escape(answer_prefix)})(.*)(?:\n|$)", output, flags=re.IGNORECASE)
    if match is None:
        match = re.search(r"(?:^)(.*)(?:\n|$)", output)
    assert match is not None  # the first-line pattern matches every string
    extracted = match[1].strip()
    return re.sub(f"^{re.escape(answer_prefix)}", "", extracted, flags=re.IGNORECASE).strip()


def _check_golds(golds: Sequence[str]) -> list[str]:
    if isinstance(golds, str):
        golds = [golds]
    golds = list(golds)
    if not golds:
        raise ValueError("no gold answers given (need at least one alias)")
    for g in golds:
        if not isinstance(g, str):
            raise ValueError(f"gold answer {g!r} is a {type(g).__name__}, expected a string")  # noqa: TRY004
    return golds


def _text_metrics(prediction: str, golds: list[str]) -> dict[str, float]:
    return {
        "exact_match": float(max(exact_match(prediction, g) for g in golds)),
        "f1": max(token_f1(prediction, g) for g in golds),
        "substring_exact_match": float(max(substring_exact_match(prediction, g) for g in golds)),
    }


def mab_scores(output: str, golds: Sequence[str], parsed_only: bool = False) -> dict[str, float]:
    """MAB's exact_match, f1 and substring_exact_match of one model output, each the max over
    gold aliases and over (raw output, parsed answer).

    `parsed_only=True` scores the parsed answer alone, which is what MAB does for its ICL
    (in-context classification) sources.
    """
    golds = _check_golds(golds)
    parsed = _text_metrics(parse_output(output), golds)
    if parsed_only:
        return parsed
    raw = _text_metrics(output, golds)
    return {k: max(raw[k], parsed[k]) for k in MAB_METRICS}


def eventqa_recall(prediction: str, golds: Sequence[str]) -> float:
    """MAB eventqa: 1 if every gold element occurs (lowercased) in the prediction, else 0."""
    golds = _check_golds(golds)
    return float(all(g.lower() in prediction.lower() for g in golds))


def ruler_recall(prediction: str, golds: Sequence[str]) -> float:
    """MAB ruler_niah: the fraction of gold elements that occur (lowercased) in the prediction."""
    golds = _check_golds(golds)
    return sum(g.lower() in prediction.lower() for g in golds) / len(golds)


# ---------------------------------------------------------------------------------------------
# Memalpha metrics
# ---------------------------------------------------------------------------------------------


def strip_thinking(prediction: str) -> str:
    """Drop a reasoning block before scoring, as Mem-alpha does: keep the text after the last
    `</think>`; an unterminated `<think>` leaves nothing to score (Mem-alpha substitutes "Empty").
    (Mem-alpha keeps the text after the *first* `</think>`; with one block the two agree.)"""
    if "</think>" in prediction:
        prediction = prediction.rsplit("</think>", 1)[1].strip()
    if "<think>" in prediction:
        return ""
    return prediction


def contains_gold(prediction: str, golds: Sequence[str]) -> float:
    """Memalpha squad/hotpotqa: 1 if some lowercased gold alias is a substring of the lowercased
    prediction. (Mem-alpha looks at the first alias only; we take any alias (ours).)"""
    golds = _check_golds(golds)
    pred = prediction.lower()
    return float(any(g.lower() in pred for g in golds))


def part_recall(prediction: str, golds: Sequence[str]) -> float:
    """Memalpha perltqa: the fraction of the `;`-separated parts of the gold found in the
    prediction (lowercased, parts stripped); max over gold aliases.

    Mem-alpha compares lowercased parts against the prediction *as written* when the gold has
    several parts (so a capitalised mention is missed); we lowercase both sides (ours)."""
    golds = _check_golds(golds)
    pred = prediction.lower()
    best = 0.0
    for gold in golds:
        parts = [p.strip().lower() for p in gold.split(";")]
        parts = [p for p in parts if p] or [gold.lower()]
        best = max(best, sum(p in pred for p in parts) / len(parts))
    return best


def gold_keywords(golds: Sequence[str]) -> list[str]:
    """The keyword list of a booksum / infbench_sum gold: every gold string is split on `,` and
    `;` and stripped, so a list of keywords and one comma-separated string mean the same."""
    golds = _check_golds(golds)
    keywords = [k.strip() for g in golds for k in re.split(r"[,;]", g)]
    keywords = [k for k in keywords if k]
    if not keywords:
        raise ValueError(f"gold {golds!r} holds no keywords")
    return keywords


def keyword_recall(prediction: str, golds: Sequence[str]) -> float:
    """Memalpha booksum / infbench_sum: the fraction of gold keywords found (lowercased) in the
    prediction. Repeated keywords count each time, as in Mem-alpha."""
    keywords = gold_keywords(golds)
    pred = prediction.lower()
    return sum(k.lower() in pred for k in keywords) / len(keywords)


def _balanced_braces_after(text: str, opener: str) -> str | None:
    """Content of the `{...}` that starts at the first occurrence of `opener` (which ends in
    `{`), honouring nested braces; None if absent or unbalanced."""
    start = text.find(opener)
    if start < 0:
        return None
    depth = 0
    content_start = start + len(opener)
    for i in range(content_start - 1, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[content_start:i]
    return None


def extract_label(prediction: str) -> str:
    """Mem-alpha's answer extraction for classification: the content of the first
    `<answer>...</answer>`, else of the first `\\boxed{...}`, else of the first `\\box{...}`,
    else the whole text; stripped of surrounding quotes and spaces."""
    tag = re.search(r"<answer>(.*?)</answer>", prediction, flags=re.DOTALL | re.IGNORECASE)
    if tag is not None:
        label = tag.group(1).strip()
    else:
        label = _balanced_braces_after(prediction, "\\boxed{")
        if label is None:
            label = _balanced_braces_after(prediction, "\\box{")
        label = (label if label is not None else prediction).strip()
    return label.strip("\"'").strip()


def boxed_label(prediction: str, golds: Sequence[str]) -> float:
    """Memalpha classification (pubmed-rct, icl_*): 1 if the extracted label is a bare integer
    equal to a gold label (gold stripped of quotes), else 0."""
    golds = _check_golds(golds)
    label = extract_label(prediction)
    if not re.fullmatch(r"\d+", label):
        return 0.0
    return float(any(label == g.strip().strip("\"'").strip() for g in golds))


LME_JUDGE_TEMPLATE = (
    "I will give you a question, a rubric for desired personalized response, and a response from "
    "a model. Please answer yes if the response satisfies the desired response. Otherwise, answer "
    "no. The model does not need to reflect all the points in the rubric. The response is correct "
    "as long as it recalls and utilizes the user's personal information correctly.\n\n"
    "Question: {question}\n\nRubric: {rubric}\n\nModel Response: {response}\n\n"
    "Is the model response correct? Answer yes or no only."
)


def judge_prompt(question: str, prediction: str, golds: Sequence[str]) -> str:
    """Mem-alpha's lme_train judge prompt (the gold answers are the rubric, joined by newlines)."""
    golds = _check_golds(golds)
    return LME_JUDGE_TEMPLATE.format(question=question, rubric="\n".join(golds), response=prediction)


def parse_judge_verdict(reply: str) -> bool:
    """Mem-alpha's verdict rule: correct iff the lowercased reply contains "yes" and not "no"."""
    reply = reply.strip().lower()
    return "yes" in reply and "no" not in reply


# ---------------------------------------------------------------------------------------------
# Source tables and dispatch
# ---------------------------------------------------------------------------------------------


def metric_for_source(data_source: str) -> str:
    """The default metric of a data source (Memalpha names, MAB `metadata.source` names,
    "synthetic").

    - synthetic: substring_exact_match (ours: MAB normalisation is robust to punctuation and
      articles, and a gold value either is or is not in the answer).
    - squad, hotpotqa: substring; perltqa: part_recall; booksum, infbench_sum*: keyword_recall;
      pubmed-rct, ttl_train, icl_*: boxed_label; lme_train, longmemeval*: llm_judge (Mem-alpha).
      MAB scores icl_* with parsed-answer text metrics and infbench_sum / longmemeval with a
      GPT judge; we follow Mem-alpha's evaluation of those sources (its prompts ask for a boxed
      label and keyword-covering summaries); pass metric= to use the MAB text metrics instead.
    - eventqa*: eventqa_recall; ruler_niah*: ruler_recall (MAB post_process).
    - ruler_qa*, factconsolidation*, detectiveqa*, other infbench_*, anything else:
      substring_exact_match (MAB's default_post_process, reported as SubEM in the MAB paper).
    - recsys*: not supported (MAB needs its entity2id.json movie table).
    """
    s = data_source.lower()
    if s == "synthetic":
        return "substring_exact_match"
    if s in ("squad", "hotpotqa"):
        return "substring"
    if s == "perltqa":
        return "part_recall"
    if s == "booksum" or s.startswith("infbench_sum"):
        return "keyword_recall"
    if s in ("pubmed-rct", "pubmed_rct") or "ttl_train" in s or "icl" in s:
        return "boxed_label"
    if s == "lme_train" or s.startswith("longmemeval"):
        return "llm_judge"
    if "eventqa" in s:
        return "eventqa_recall"
    if "ruler_niah" in s:
        return "ruler_recall"
    if "recsys" in s:
        raise ValueError(
            f"data source {data_source!r}: recommendation recall needs MAB's entity2id.json movie "
            "table, which finemem does not score"
        )
    return "substring_exact_match"


def competency_for_source(data_source: str) -> str:
    """The competency (records.COMPETENCIES) a Memalpha / MAB source measures."""
    s = data_source.lower()
    if s.startswith("factconsolidation"):
        return "conflict_resolution"
    if s == "booksum" or s.startswith("infbench") or "detective" in s:
        return "long_range_understanding"
    if s in ("pubmed-rct", "pubmed_rct") or "ttl_train" in s or s.startswith("icl") or "recsys" in s:
        return "test_time_learning"
    if (
        s in ("synthetic", "squad", "hotpotqa", "perltqa", "lme_train")
        or s.startswith(("ruler", "longmemeval", "eventqa"))
    ):
        return "accurate_retrieval"
    raise ValueError(f"unknown data source {data_source!r}: no competency is known for it")


def score_answer(
    prediction: str,
    golds: Sequence[str],
    data_source: str,
    metric: str = "auto",
    question: str | None = None,
    judge: Judge | None = None,
) -> float:
    """Score one answer in [0, 1] with `metric` ("auto": `metric_for_source(data_source)`).

    A `<think>` block is dropped first (`strip_thinking`). `llm_judge` calls
    `judge(question, prediction, golds)`; there is no default judge, so it raises without one.
    MAB text metrics on an icl_* source score the parsed answer only, as MAB does.
    """
    name = metric_for_source(data_source) if metric == "auto" else metric
    golds = _check_golds(golds)
    prediction = strip_thinking(prediction)
    if name in MAB_METRICS:
        return float(mab_scores(prediction, golds, parsed_only="icl" in data_source.lower())[name])
    if name == "substring":
        return contains_gold(prediction, golds)
    if name == "part_recall":
        return part_recall(prediction, golds)
    if name == "keyword_recall":
        return keyword_recall(prediction, golds)
    if name == "boxed_label":
        return boxed_label(prediction, golds)
    if name == "eventqa_recall":
        return eventqa_recall(prediction, golds)
    if name == "ruler_recall":
        return ruler_recall(prediction, golds)
    if name == "llm_judge":
        if judge is None:
            raise ValueError(
                f"data source {data_source!r} is scored by an LLM yes/no judge: pass "
                "judge=callable(question, prediction, golds) -> bool (see reward.answerers)"
            )
        return float(bool(judge(question or "", prediction, golds)))
    raise ValueError(f"unknown metric {name!r}; known: auto, {', '.join(METRICS)}")


def summarize_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-source and per-competency means of scored answers, for evaluation reports.

    Each record needs `data_source` and `score`; `competency` is taken from the record or else
    from `competency_for_source`; an optional `memory_tokens` is averaged alongside.
    per_source: item means. per_competency and overall: the unweighted mean of their sources'
    means (ours: MAB and Mem-alpha report a competency as the average of its datasets), with
    the item counts beside them.
    """
    by_source: dict[str, list[float]] = {}
    memory: dict[str, list[float]] = {}
    competency_of: dict[str, str] = {}
    for i, rec in enumerate(records):
        for key in ("data_source", "score"):
            if key not in rec:
                raise ValueError(f"score record {i}: missing field {key!r}")
        src = str(rec["data_source"])
        score = float(rec["score"])
        if math.isnan(score):
            raise ValueError(f"score record {i}: field 'score' is NaN")
        by_source.setdefault(src, []).append(score)
        if rec.get("memory_tokens") is not None:
            memory.setdefault(src, []).append(float(rec["memory_tokens"]))
        competency_of.setdefault(src, str(rec.get("competency") or competency_for_source(src)))

    per_source = {}
    for src in sorted(by_source):
        entry: dict[str, float] = {"mean": _mean(by_source[src]), "n": len(by_source[src])}
        if src in memory:
            entry["memory_tokens"] = _mean(memory[src])
        per_source[src] = entry
    per_competency = {}
    for comp in COMPETENCIES:
        sources = [s for s in per_source if competency_of[s] == comp]
        if sources:
            per_competency[comp] = {
                "mean": _mean([per_source[s]["mean"] for s in sources]),
                "n": sum(per_source[s]["n"] for s in sources),
                "sources": sources,
            }
    overall = {
        "mean": _mean([e["mean"] for e in per_source.values()]) if per_source else 0.0,
        "n": sum(e["n"] for e in per_source.values()),
    }
    return {"overall": overall, "per_source": per_source, "per_competency": per_competency}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# ---------------------------------------------------------------------------------------------
# `finemem score FILE`: recompute the metrics of a results file and compare with its verdicts
# ---------------------------------------------------------------------------------------------

F1_TOLERANCE = 1e-6


@dataclass
class ScoredItem:
    """One item of a results file: what the file says and what we recompute."""

    index: int
    item_id: str
    output: str
    golds: list[str]
    stored: dict[str, float]
    recomputed: dict[str, float]

    def disagreements(self) -> list[str]:
        return [
            k
            for k in self.stored
            if abs(self.stored[k] - self.recomputed[k]) > (F1_TOLERANCE if k == "f1" else 1e-9)
        ]


@dataclass
class ScoreReport:
    path: str
    kind: str
    items: list[ScoredItem] = field(default_factory=list)

    @property
    def disagreeing(self) -> list[ScoredItem]:
        return [it for it in self.items if it.disagreements()]


class ResultsFileError(ValueError):
    """A results file that cannot be read; the message names the file, row and field."""


def _field(path: Path, row: str, obj: Mapping[str, Any], name: str, kind: type | tuple) -> Any:
    if not isinstance(obj, Mapping):
        raise ResultsFileError(f"{path}: {row}: expected a JSON object, got {type(obj).__name__}")
    if name not in obj:
        raise ResultsFileError(f"{path}: {row}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind):
        raise ResultsFileError(
            f"{path}: {row}: field {name!r} is {type(value).__name__}, expected {_kind_name(kind)}"
        )
    return value


def _kind_name(kind: type | tuple) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _golds_field(path: Path, row: str, obj: Mapping[str, Any], name: str) -> list[str]:
    value = _field(path, row, obj, name, (list, str))
    golds = [value] if isinstance(value, str) else value
    if golds and all(isinstance(g, list) for g in golds):  # MAB may nest aliases
        golds = [g for sub in golds for g in sub]
    if not golds or not all(isinstance(g, str) for g in golds):
        raise ResultsFileError(f"{path}: {row}: field {name!r} must be a non-empty list of strings")
    return golds


def score_mab_results(path: Path, metric: str = "auto") -> ScoreReport:
    """Recompute exact_match / f1 / substring_exact_match of a MAB results json (items under
    "data" with `output`, `answer` and the stored scores)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsFileError(f"{path}: not valid JSON: {e}") from e
    items = _field(path, "top level", doc, "data", list)
    sub_dataset = ""
    if isinstance(doc.get("dataset_config"), Mapping):
        sub_dataset = str(doc["dataset_config"].get("sub_dataset") or "")
    if metric != "auto" and metric not in MAB_METRICS:
        raise ResultsFileError(f"{path}: MAB results carry {', '.join(MAB_METRICS)}; not {metric!r}")
    names = MAB_METRICS if metric == "auto" else (metric,)
    report = ScoreReport(path=str(path), kind="mab")
    for i, item in enumerate(items):
        row = f"data[{i}]"
        output = _field(path, row, item, "output", str)
        golds = _golds_field(path, row, item, "answer")
        stored = {k: float(_field(path, row, item, k, (bool, int, float))) for k in names}
        scores = mab_scores(output, golds, parsed_only="icl" in sub_dataset.lower())
        report.items.append(
            ScoredItem(
                index=i,
                item_id=str(item.get("qa_pair_id", item.get("query_id", i))),
                output=output,
                golds=golds,
                stored=stored,
                recomputed={k: scores[k] for k in names},
            )
        )
    return report


def score_jsonl_results(path: Path, metric: str = "auto") -> ScoreReport:
    """Recompute the `correct` verdict of jsonl rows {answer, golds, correct[, source]}:
    correct iff the row's score (metric "auto": by the row's `source`/`data_source`, else
    substring_exact_match) is 1."""
    report = ScoreReport(path=str(path), kind="jsonl")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = f"line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResultsFileError(f"{path}: {row}: not valid JSON: {e}") from e
            answer = _field(path, row, obj, "answer", str)
            golds = _golds_field(path, row, obj, "golds")
            correct = _field(path, row, obj, "correct", bool)
            source = obj.get("source") or obj.get("data_source") or "synthetic"
            try:
                score = score_answer(answer, golds, str(source), metric)
            except ValueError as e:
                raise ResultsFileError(f"{path}: {row}: {e}") from e
            report.items.append(
                ScoredItem(
                    index=lineno,
                    item_id=str(obj.get("qa_pair_id") or obj.get("id") or lineno),
                    output=answer,
                    golds=golds,
                    stored={"correct": float(correct)},
                    recomputed={"correct": float(score >= 1.0)},
                )
            )
    return report


def score_file(path: str | Path, metric: str = "auto") -> ScoreReport:
    """Read either kind of results file (by extension: .jsonl rows, else a MAB json)."""
    path = Path(path)
    if not path.is_file():
        raise ResultsFileError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        return score_jsonl_results(path, metric)
    return score_mab_results(path, metric)


def _short(text: str, n: int = 80) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def print_report(report: ScoreReport, show: int) -> None:
    n = len(report.items)
    print(f"{report.path}: {n} items ({report.kind})")
    names = list(report.items[0].stored) if report.items else []
    for k in names:
        rec = _mean([it.recomputed[k] for it in report.items])
        sto = _mean([it.stored[k] for it in report.items])
        print(f"  {k:<24} recomputed {rec:.4f}   stored {sto:.4f}")
    bad = report.disagreeing
    print(f"  disagreements: {len(bad)} of {n}")
    for it in bad[:show]:
        diffs = ", ".join(
            f"{k} stored {it.stored[k]:g} recomputed {it.recomputed[k]:g}" for k in it.disagreements()
        )
        print(f"    #{it.index} {it.item_id}: {diffs}; output={_short(it.output)!r} golds={it.golds!r}")


def cli(argv: list[str]) -> int:
    """`finemem score FILE [--metric NAME] [--show N]`: recompute the metrics of a results file
    and count the items whose stored verdicts disagree. Exit 0 if all agree, 1 if some
    disagree, 2 if the file cannot be read."""
    from finemem.cli import parse_command

    parser = argparse.ArgumentParser(prog="finemem score", description=cli.__doc__)
    parser.add_argument("file", help="MAB results .json, or .jsonl rows {answer, golds, correct}")
    parser.add_argument("--metric", default="auto", choices=("auto", *METRICS))
    parser.add_argument("--show", type=int, default=5, help="list the first N disagreements")
    args, _ = parse_command(parser, argv)
    try:
        report = score_file(args.file, args.metric)
    except ResultsFileError as e:
        print(f"finemem score: {e}", file=sys.stderr)
        return 2
    print_report(report, args.show)
    return 1 if report.disagreeing else 0
