"""`make bench`'s runner (bench/summary.py): it reads each benchmark's last `ratio:` line, and a
benchmark that fails or prints no ratio is a row that says so and makes the runner fail."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_summary():
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_summary"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_last_ratio_line_wins_and_other_lines_are_ignored():
    summary = load_summary()
    assert summary.last_ratio("ratio: 1.5\nsome text ratio: 9\nratio: 2.25\n") == "2.25"
    assert summary.last_ratio("no ratio here\nratio:\n") is None


def test_rows_report_ratio_failure_and_missing_ratio(tmp_path):
    summary = load_summary()
    good, bad, silent = tmp_path / "good.py", tmp_path / "bad.py", tmp_path / "silent.py"
    good.write_text("print('calls: 10')\nprint('ratio: 3.00')\n")
    bad.write_text("print('ratio: 5')\nraise SystemExit(3)\n")
    silent.write_text("print('done')\n")
    rows = [(b, *summary.run_one(b)) for b in (
        summary.Bench("good", (str(good),), ">= 2", "x"),
        summary.Bench("bad", (str(bad),), ">= 2", "x"),
        summary.Bench("silent", (str(silent),), ">= 2", "x"),
    )]
    assert [(r[1], r[2]) for r in rows] == [("3.00", 0), ("5", 3), (None, 0)]
    text = summary.table(rows)
    assert "| good | 3.00 | >= 2 |" in text
    assert "| bad | failed (exit 3) |" in text and "| silent | no ratio printed |" in text


def test_every_benchmark_script_exists_and_unknown_names_are_refused():
    summary = load_summary()
    for bench in summary.BENCHES:
        assert (ROOT / bench.args[0]).is_file(), bench.args[0]
    out = subprocess.run([sys.executable, "bench/summary.py", "--only", "episode_runner,warp"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "unknown benchmark(s) warp" in out.stderr
