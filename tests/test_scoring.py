"""Scoring: MAB text metrics against official result files, Memalpha metrics, dispatch, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finemem import scoring as S

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FACTCONS = SHARED / "data" / "mab_factconsolidation"
RULER = SHARED / "data" / "mab_ruler_qa" / "results_ruler_qa2_421K_replay_full.jsonl"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared developer data not present: {path} (needs ../shared beside the repo)")
    return path


# --------------------------------------------------------------------------------------------
# Conformance with official scorer outputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["results_sh_6k.json", "results_mh_6k.json"])
def test_mab_results_match_stored_scores_item_by_item(name):
    doc = json.loads(_need(FACTCONS / name).read_text(encoding="utf-8"))
    assert len(doc["data"]) == 100
    for item in doc["data"]:
        got = S.mab_scores(item["output"], item["answer"])
        where = f"{name} {item['qa_pair_id']}: output={item['output']!r} golds={item['answer']!r}"
        assert got["exact_match"] == float(item["exact_match"]), where
        assert got["substring_exact_match"] == float(item["substring_exact_match"]), where
        assert got["f1"] == pytest.approx(float(item["f1"]), abs=1e-6), where
        assert S.parse_output(item["output"]) == item["parsed_output"], where
    # the file's own averages (x100) follow
    for k in S.MAB_METRICS:
        mean = sum(S.mab_scores(it["output"], it["answer"])[k] for it in doc["data"]) / len(doc["data"])
        assert 100 * mean == pytest.approx(doc["averaged_metrics"][k], abs=1e-6)


def test_ruler_qa_rows_match_stored_correct_verdicts():
    rows = [json.loads(line) for line in _need(RULER).read_text(encoding="utf-8").splitlines() if line]
    assert len(rows) == 100
    assert S.metric_for_source(rows[0]["source"]) == "substring_exact_match"
    for row in rows:
        score = S.score_answer(row["answer"], row["golds"], row["source"])
        assert (score == 1.0) == row["correct"], row["qa_pair_id"]
    assert sum(r["correct"] for r in rows) == 71


def test_ruler_qa_verdicts_need_the_normalisation():
    """At least one row is decided by normalisation, not by plain lowercase containment."""
    rows = [json.loads(line) for line in _need(RULER).read_text(encoding="utf-8").splitlines() if line]
    plain = [any(g.lower() in r["answer"].lower() for g in r["golds"]) for r in rows]
    assert any(p != r["correct"] for p, r in zip(plain, rows))


# --------------------------------------------------------------------------------------------
# MAB primitives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The  Cat's, hat!", "cats hat"),
        ("an apple a day", "apple day"),
        ("the-end", "theend"),  # punctuation goes first, so "the" is glued and kept
        ("A.", ""),
        ("PESÄPALLO", "pesäpallo"),
        ("“quoted”", "“quoted”"),  # non-ASCII punctuation is kept
        ("  x \n\t y ", "x y"),
        ("theatre", "theatre"),
    ],
)
def test_normalize_answer(text, expected):
    assert S.normalize_answer(text) == expected


@pytest.mark.parametrize(
    "output,expected",
    [
        ("Some reasoning.\nAnswer: Paris\nMore text", "Paris"),
        ("answer: answer: Lyon", "Lyon"),
        ("ANSWER:Rome", "Rome"),
        ("first line\nsecond line", "first line"),
        ("  padded  \nnext", "padded"),
        ("", ""),
        ("\nAfter a blank first line", ""),
        ("The answer: is here", "is here"),  # the prefix may sit inside a line
    ],
)
def test_parse_output(output, expected):
    assert S.parse_output(output) == expected


def test_token_f1_and_yes_no_rule():
    assert S.token_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert S.token_f1("yes", "no") == 0.0
    assert S.token_f1("yes it is", "yes") == 0.0  # gold is special and they differ
    assert S.token_f1("Yes.", "yes") == 1.0
    assert S.token_f1("noanswer", "noanswer") == 1.0
    assert S.token_f1("the", "a") == 0.0  # both normalise to nothing
    assert S.token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)


def test_mab_scores_keep_the_max_of_raw_and_parsed():
    out = "Let me think about the facts.\nAnswer: Paris"
    raw_only = S._text_metrics(out, ["Paris"])
    assert raw_only["exact_match"] == 0.0 and raw_only["f1"] < 1.0
    assert S.mab_scores(out, ["Paris"]) == {"exact_match": 1.0, "f1": 1.0, "substring_exact_match": 1.0}
    # the raw output can be the better one: the gold is on the second line only
    out2 = "I am not sure.\nIt is Lyon"
    got = S.mab_scores(out2, ["Lyon"])
    assert got["substring_exact_match"] == 1.0 and got["exact_match"] == 0.0
    assert S.mab_scores(out2, ["Lyon"], parsed_only=True)["substring_exact_match"] == 0.0


def test_mab_scores_max_over_aliases_and_bad_golds():
    got = S.mab_scores("the United Kingdom", ["UK", "United Kingdom"])
    assert got == {"exact_match": 1.0, "f1": 1.0, "substring_exact_match": 1.0}
    assert S.mab_scores("x", "x")["exact_match"] == 1.0  # a bare string is one alias
    with pytest.raises(ValueError, match="no gold"):
        S.mab_scores("x", [])
    with pytest.raises(ValueError, match="expected a string"):
        S.mab_scores("x", [3])


def test_substring_exact_match_is_not_word_aligned():
    assert S.substring_exact_match("in 48215", "4821")  # as in MAB: plain substring
    assert not S.substring_exact_match("London", "New London")


# --------------------------------------------------------------------------------------------
# Memalpha metrics
# --------------------------------------------------------------------------------------------


def test_memalpha_substring_any_alias_lowercase():
    assert S.score_answer("It was in PARIS.", ["paris"], "squad") == 1.0
    assert S.score_answer("It was in Lyon.", ["Paris", "lyon"], "hotpotqa") == 1.0
    assert S.score_answer("It was in Lyon.", ["Paris"], "hotpotqa") == 0.0
    # no normalisation: punctuation in the gold must be present
    assert S.score_answer("St Louis", ["St. Louis"], "squad") == 0.0


def test_perltqa_part_recall():
    gold = ["Beijing; 2019 ;Alice"]
    assert S.score_answer("She met alice in Beijing.", gold, "perltqa") == pytest.approx(2 / 3)
    assert S.score_answer("nothing", gold, "perltqa") == 0.0
    assert S.score_answer("ALICE", ["alice"], "perltqa") == 1.0
    assert S.score_answer("a b", ["a;;b;"], "perltqa") == 1.0  # empty parts are ignored


def test_keyword_recall_list_or_separated_string():
    pred = "Tom sails to the island, meets a storm and returns home."
    assert S.score_answer(pred, ["island, storm; treasure, home"], "booksum") == 0.75
    assert S.score_answer(pred, ["island", "storm", "treasure", "home"], "booksum") == 0.75
    assert S.score_answer(pred, ["Island"], "infbench_sum_eng_shots2") == 1.0
    assert S.gold_keywords(["a, b", "c"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no keywords"):
        S.keyword_recall("x", [" , ;"])


@pytest.mark.parametrize(
    "pred,score",
    [
        ("The label is \\boxed{3}.", 1.0),
        ("\\boxed{ 3 }", 1.0),
        ("\\boxed{3} or maybe \\boxed{4}", 1.0),
        ("\\boxed{4} or maybe \\boxed{3}", 0.0),  # the first box decides
        ("\\boxed{\\text{3}}", 0.0),  # nested braces are kept, so not a bare digit
        ("\\boxed{three}", 0.0),
        ("\\boxed{3", 0.0),  # unterminated: the whole text is not a digit
        ("<answer>3</answer> \\boxed{4}", 1.0),  # Mem-alpha reads <answer> tags first
        ("'3'", 1.0),  # a bare label with quotes is accepted, as in Mem-alpha
        ("label 3", 0.0),
        ("\\box{3}", 1.0),
        ("<think>\\boxed{4}</think>\\boxed{3}", 1.0),
    ],
)
def test_boxed_label(pred, score):
    assert S.score_answer(pred, ["3"], "pubmed-rct") == score


def test_boxed_label_sources():
    for src in ("icl_trec_coarse_6600shot_balance", "icl_nlu_8296shot_balance", "icl_banking77_5900shot_balance"):
        assert S.metric_for_source(src) == "boxed_label"
        assert S.score_answer("\\boxed{12}", ["12"], src) == 1.0
        assert S.score_answer("\\boxed{12}", ["1"], src) == 0.0


def test_thinking_is_stripped_before_scoring():
    assert S.strip_thinking("<think>Paris?</think> Lyon") == "Lyon"
    assert S.strip_thinking("<think>never closed Paris") == ""
    assert S.score_answer("<think>Paris</think>Lyon", ["paris"], "squad") == 0.0
    assert S.score_answer("<think>\n\n</think>\n\nParis", ["paris"], "squad") == 1.0


def test_llm_judge_needs_a_judge():
    with pytest.raises(ValueError, match="LLM yes/no judge"):
        S.score_answer("I like tea", ["tea"], "lme_train", question="What do I like?")
    seen = []

    def judge(question, prediction, golds):
        seen.append((question, prediction, golds))
        return prediction.endswith("tea")

    assert S.score_answer("I like tea", ["tea"], "longmemeval_s*", question="q?", judge=judge) == 1.0
    assert S.score_answer("I like coffee", ["tea"], "lme_train", question="q?", judge=judge) == 0.0
    assert seen[0] == ("q?", "I like tea", ["tea"])


def test_judge_prompt_and_verdict():
    prompt = S.judge_prompt("What do I like?", "tea, I think", ["tea"])
    assert "Question: What do I like?" in prompt and "Rubric: tea" in prompt and "tea, I think" in prompt
    assert S.parse_judge_verdict(" Yes ")
    assert not S.parse_judge_verdict("No")
    assert not S.parse_judge_verdict("yes, but not fully")  # contains "no", as in Mem-alpha


def test_eventqa_and_ruler_recall():
    assert S.score_answer("He went to Rome, then Paris", ["rome", "paris"], "eventqa_full") == 1.0
    assert S.score_answer("He went to Rome", ["rome", "paris"], "eventqa_full") == 0.0
    assert S.score_answer("keys 11 and 22", ["11", "22", "33"], "ruler_niah_mq_8k") == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,metric",
    [
        ("synthetic", "substring_exact_match"),
        ("squad", "substring"),
        ("hotpotqa", "substring"),
        ("perltqa", "part_recall"),
        ("booksum", "keyword_recall"),
        ("infbench_sum_eng_shots2", "keyword_recall"),
        ("pubmed-rct", "boxed_label"),
        ("icl_trec_coarse_6600shot_balance", "boxed_label"),
        ("lme_train", "llm_judge"),
        ("longmemeval_s*", "llm_judge"),
        ("ruler_qa1_197K", "substring_exact_match"),
        ("factconsolidation_sh_6k", "substring_exact_match"),
        ("factconsolidation_mh_262k", "substring_exact_match"),
        ("detectiveqa", "substring_exact_match"),
        ("infbench_qa_eng", "substring_exact_match"),
        ("eventqa_full", "eventqa_recall"),
        ("ruler_niah_mq_8k", "ruler_recall"),
    ],
)
def test_metric_for_source(source, metric):
    assert S.metric_for_source(source) == metric


def test_recsys_is_refused_and_unknown_metric_raises():
    with pytest.raises(ValueError, match="entity2id"):
        S.metric_for_source("recsys_redial_full")
    with pytest.raises(ValueError, match="unknown metric"):
        S.score_answer("x", ["x"], "squad", metric="bleu")


def test_explicit_metric_overrides_the_source_and_icl_uses_parsed_answer():
    assert S.score_answer("the Paris", ["paris"], "squad", metric="exact_match") == 1.0
    assert S.score_answer("Paris, France", ["paris"], "squad", metric="f1") == pytest.approx(2 / 3)
    # MAB scores ICL sources on the parsed answer only
    out = "label: 3\nbut the real answer is 4"
    assert S.score_answer(out, ["4"], "ruler_qa1_197K", metric="substring_exact_match") == 1.0
    assert S.score_answer(out, ["4"], "icl_banking77_5900shot_balance", metric="substring_exact_match") == 0.0


@pytest.mark.parametrize(
    "source,competency",
    [
        ("squad", "accurate_retrieval"),
        ("lme_train", "accurate_retrieval"),
        ("ruler_qa2_421K", "accurate_retrieval"),
        ("longmemeval_s*", "accurate_retrieval"),
        ("pubmed-rct", "test_time_learning"),
        ("icl_nlu_8296shot_balance", "test_time_learning"),
        ("booksum", "long_range_understanding"),
        ("infbench_sum_eng_shots2", "long_range_understanding"),
        ("factconsolidation_mh_6k", "conflict_resolution"),
    ],
)
def test_competency_for_source(source, competency):
    assert S.competency_for_source(source) == competency


def test_competency_for_unknown_source_raises():
    with pytest.raises(ValueError, match="unknown data source"):
        S.competency_for_source("mystery")


def test_summarize_scores():
    records = [
        {"data_source": "squad", "score": 1.0, "memory_tokens": 100},
        {"data_source": "squad", "score": 0.0, "memory_tokens": 300},
        {"data_source": "perltqa", "score": 0.5},
        {"data_source": "booksum", "score": 0.25},
        {"data_source": "synthetic", "score": 1.0, "competency": "conflict_resolution"},
    ]
    out = S.summarize_scores(records)
    assert out["per_source"]["squad"] == {"mean": 0.5, "n": 2, "memory_tokens": 200.0}
    ar = out["per_competency"]["accurate_retrieval"]
    assert ar["mean"] == 0.5 and ar["n"] == 3 and ar["sources"] == ["perltqa", "squad"]
    assert out["per_competency"]["long_range_understanding"]["mean"] == 0.25
    assert out["per_competency"]["conflict_resolution"]["sources"] == ["synthetic"]
    assert "test_time_learning" not in out["per_competency"]
    assert out["overall"] == {"mean": pytest.approx((0.5 + 0.5 + 0.25 + 1.0) / 4), "n": 5}
    with pytest.raises(ValueError, match="record 0: missing field 'score'"):
        S.summarize_scores([{"data_source": "squad"}])


# --------------------------------------------------------------------------------------------
# `finemem score`
# --------------------------------------------------------------------------------------------


def test_cli_agrees_on_the_official_files(capsys):
    for path in (_need(FACTCONS / "results_sh_6k.json"), FACTCONS / "results_mh_6k.json", RULER):
        assert S.cli([str(path)]) == 0
        out = capsys.readouterr().out
        assert "disagreements: 0 of 100" in out


def test_cli_reports_disagreements_in_a_mab_file(tmp_path, capsys):
    doc = {
        "dataset_config": {"sub_dataset": "factconsolidation_sh_6k"},
        "data": [
            {"output": "Paris", "answer": ["Paris"], "exact_match": True, "f1": 1.0, "substring_exact_match": True},
            {"output": "Lyon", "answer": ["Paris"], "exact_match": True, "f1": 0.0, "substring_exact_match": False,
             "qa_pair_id": "bad_one"},
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    assert S.cli([str(path), "--show", "3"]) == 1
    out = capsys.readouterr().out
    assert "disagreements: 1 of 2" in out
    assert "bad_one: exact_match stored 1 recomputed 0" in out
    # checking only the metric that agrees passes
    assert S.cli([str(path), "--metric", "f1"]) == 0


def test_cli_reports_disagreements_in_a_jsonl_file(tmp_path, capsys):
    rows = [
        {"answer": "Yes", "golds": ["yes"], "correct": True},
        {"answer": "Paris", "golds": ["Lyon"], "correct": True, "qa_pair_id": "q2"},
        {"answer": "\\boxed{2}", "golds": ["2"], "correct": True, "source": "pubmed-rct"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert S.cli([str(path)]) == 1
    out = capsys.readouterr().out
    assert "disagreements: 1 of 3" in out and "q2" in out


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ('{"answer": "x", "correct": true}\n', ".jsonl", "line 1: missing field 'golds'"),
        ('{"answer": "x", "golds": ["x"], "correct": true}\n{oops\n', ".jsonl", "line 2: not valid JSON"),
        ('{"answer": 3, "golds": ["x"], "correct": true}\n', ".jsonl", "line 1: field 'answer' is int"),
        ('{"answer": "x", "golds": [], "correct": true}\n', ".jsonl", "line 1: field 'golds' must be"),
        ('{"data": [{"output": "x", "answer": ["x"], "f1": 1.0, "substring_exact_match": true}]}', ".json",
         "data[0]: missing field 'exact_match'"),
        ('{"items": []}', ".json", "top level: missing field 'data'"),
        ('{"answer": "x", "golds": ["x"], "correct": true, "source": "lme_train"}\n', ".jsonl",
         "line 1: data source 'lme_train' is scored by an LLM"),
    ],
)
def test_cli_names_file_row_and_field_of_bad_input(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    assert S.cli([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
