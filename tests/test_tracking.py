"""Run directory, metrics jsonl, W&B offline, plots."""

from finemem.config import load_config, to_container
from finemem.tracking import RunDir, Tracker, plot_curves, read_metrics


def test_tracker_writes_metrics_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config()
    run = RunDir.create(tmp_path, "t")
    tr = Tracker(run, to_container(cfg), cfg.wandb)
    for step in range(1, 4):
        tr.log({"reward/mean": step * 0.5, "nan": float("nan")}, step=step)
    tr.close()
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["reward/mean"] == 1.5 and rows[-1]["nan"] is None
    assert any(run.path.glob("wandb/offline-run-*")), "W&B offline run directory missing"
    png = plot_curves(run.metrics_path, run.plots_dir / "curve.png", ["reward/mean"])
    assert png is not None and png.stat().st_size > 1000


def test_run_dirs_never_collide(tmp_path):
    a, b = RunDir.create(tmp_path, "x"), RunDir.create(tmp_path, "x")
    assert a.path != b.path
