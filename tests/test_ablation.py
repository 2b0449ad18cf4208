"""`finemem ablation`: the aggregation maths (pure) and, heavy, the whole machinery on a tiny model:
2 presets x 1 seed x 2 steps, the table files, the skip of finished runs, and the paired data order."""

from __future__ import annotations

import json

import pytest

from learner.ablation import aggregate, first_step_reaching, mean_curve, render_markdown, verdict


def _result(preset, seed, accs, mems, order="a"):
    curve = [{"step": 5 * i, "accuracy": a, "memory_tokens": m, "memory_items": 1.0, "valid_call_rate": 1.0}
             for i, (a, m) in enumerate(zip(accs, mems, strict=True))]
    return {"preset": preset, "seed": seed, "curve": curve, "final": curve[-1], "wall_s": 60.0,
            "data_order_sha256": order}


def test_mean_curve_is_over_seeds_at_shared_steps():
    c1 = [{"step": 0, "accuracy": 0.1}, {"step": 5, "accuracy": 0.3}, {"step": 10, "accuracy": 0.5}]
    c2 = [{"step": 0, "accuracy": 0.3}, {"step": 5, "accuracy": 0.1}]  # stopped early: step 10 is not shared
    assert mean_curve([c1, c2], "accuracy") == [(0, pytest.approx(0.2), 0.1, 0.3), (5, pytest.approx(0.2), 0.1, 0.3)]
    assert mean_curve([], "accuracy") == []


def test_first_step_reaching():
    curve = [(0, 0.1, 0, 0), (5, 0.25, 0, 0), (10, 0.3, 0, 0)]
    assert first_step_reaching(curve, 0.25) == 5
    assert first_step_reaching(curve, 0.31) is None


def test_aggregate_table_fields_and_steps_to_outcome_final():
    results = [
        _result("outcome_only", 1, [0.1, 0.2, 0.3], [50, 50, 50]),
        _result("outcome_only", 2, [0.1, 0.2, 0.1], [50, 50, 50]),  # outcome-only's final mean: 0.2
        _result("finemem", 1, [0.1, 0.3, 0.4], [50, 40, 30]),
        _result("finemem", 2, [0.1, 0.2, 0.4], [50, 40, 30]),  # mean curve 0.1, 0.25, 0.4: reaches 0.2 at 5
    ]
    table = aggregate(results, ["outcome_only", "finemem"])
    fm, oo = table["presets"]["finemem"], table["presets"]["outcome_only"]
    assert fm["accuracy_mean"] == pytest.approx(0.4) and fm["accuracy_std"] == pytest.approx(0.0)
    assert oo["accuracy_per_seed"] == [0.3, 0.1] and oo["accuracy_std"] == pytest.approx(0.1)
    assert fm["steps_to_outcome_final"] == 5
    assert oo["steps_to_outcome_final"] == 5  # its own mean curve 0.1, 0.2, 0.2 first reaches 0.2 at 5
    assert fm["memory_tokens_mean"] == 30 and fm["valid_call_rate_mean"] == 1.0 and fm["wall_s"] == 120.0
    assert fm["accuracy_before_mean"] == pytest.approx(0.1)
    assert fm["gain_vs_outcome_per_seed"] == pytest.approx([0.1, 0.3]) and fm["gain_vs_outcome_mean"] == pytest.approx(0.2)
    assert oo["gain_vs_outcome_per_seed"] == [0.0, 0.0]
    assert table["paired"] is True
    assert table["verdict"][0].startswith("accuracy order Fine-Mem >= outcome-only: holds")
    md = render_markdown(table, "finemem ablation --seeds 2")
    assert "| Fine-Mem | 0.400 ± 0.000 | 0.400, 0.400 | +0.200 (+0.100, +0.300) |" in md
    assert "0.663" in md and "paired): True" in md


def test_aggregate_without_outcome_only_and_unpaired_orders():
    results = [_result("finemem", 1, [0.1, 0.2], [5, 5], order="x"), _result("csr_only", 1, [0.1, 0.3], [5, 5], order="y")]
    table = aggregate(results, ["csr_only", "finemem"])
    assert table["presets"]["finemem"]["steps_to_outcome_final"] is None
    assert table["paired"] is False  # the same seed saw different batches: not a paired comparison
    assert "does not hold" in table["verdict"][0]


def test_verdict_on_memory():
    presets = {p: {"accuracy_mean": 0.5, "accuracy_std": 0.0, "memory_tokens_mean": m}
               for p, m in {"outcome_only": 90, "csr_only": 86, "eara_only": 60, "finemem": 79}.items()}
    lines = verdict(presets)
    assert lines[0].startswith("accuracy order Fine-Mem >= +CSR >= outcome-only: holds")
    assert lines[1].startswith("EARA presets lower in memory: holds")
    presets["finemem"]["memory_tokens_mean"] = 88
    assert verdict(presets)[1].startswith("EARA presets lower in memory: does not hold")


def test_bad_presets_and_seeds_are_config_errors(tmp_path):
    from finemem.config import ConfigError
    from learner.ablation import cli

    with pytest.raises(ConfigError, match="unknown"):
        cli(["--presets", "finemem,nope", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="--seeds 0"):
        cli(["--seeds", "0", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------------------- heavy
@pytest.mark.heavy
def test_ablation_end_to_end_two_presets_one_seed_two_steps(tmp_path_factory, capsys):
    import ray
    from test_train_integration import build_train_setup, tiny_overrides

    from learner.ablation import cli

    if ray.is_initialized():
        ray.shutdown()  # the runs start a Ray sized for their roles
    tmp, model_dir = build_train_setup(tmp_path_factory.mktemp("ablation"))
    out = tmp / "ablation"
    args = ["--presets", "outcome_only,finemem", "--seeds", "1", "--out", str(out), "--warm-start", str(model_dir),
            *tiny_overrides(tmp, model_dir, tmp / "train.jsonl", tmp / "eval.jsonl", total_steps=2),
            "eval.every=1", "learner.checkpoint_every=0"]
    assert cli(args) == 0
    first = capsys.readouterr().out

    table = json.loads((out / "table.json").read_text())
    assert set(table["presets"]) == {"outcome_only", "finemem"}
    for entry in table["presets"].values():
        assert len(entry["accuracy_per_seed"]) == 1 and 0.0 <= entry["accuracy_mean"] <= 1.0
        assert [s for s, _ in entry["curve_accuracy"]] == [0, 1, 2]  # before, eval.every=1, after
        for key in ("accuracy_std", "memory_tokens_mean", "valid_call_rate_mean", "steps_to_outcome_final", "wall_s"):
            assert key in entry
    assert table["paired"] is True
    orders = {p: (out / "runs" / f"{p}-seed1" / "data_order.jsonl").read_text() for p in table["presets"]}
    assert orders["outcome_only"] == orders["finemem"] and orders["finemem"].count("\n") == 2
    configs = {p: (out / "runs" / f"{p}-seed1" / "config.yaml").read_text() for p in table["presets"]}
    differing = [(a, b) for a, b in zip(*(c.splitlines() for c in configs.values()), strict=True) if a != b]
    assert all(any(k in a for k in ("preset:", "name:", "before_training:", "- outcome_only", "- finemem"))
               for a, _ in differing), differing  # the runs differ only in the preset (and naming)
    assert (out / "table.md").read_text().count("| outcome-only |") == 1
    assert (out / "curves.png").stat().st_size > 0
    assert "warm start" in first and str(model_dir) in first

    # Run again: both runs are finished, nothing is trained, the table is written again.
    assert cli(args) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier, skipped") == 2 and "running" not in again
    assert json.loads((out / "table.json").read_text())["presets"] == table["presets"]
