"""`make bench`: every benchmark in bench/, one after another, then one table of their ratios.

Each benchmark prints its own figures and ends with `ratio: X`; this runner shows their output as
it comes, reads each last ratio line, and ends with a table: the ratio, its target, and the command
that measures it (to re-run one alone). A benchmark that fails or prints no ratio is a row that
says so, and the runner exits non-zero.

The benchmarks that need a warm-started policy use the demo's (`artifacts/sft-model`); when it is
missing it is built first, as `make demo` builds it (data, tiny policy, warm start: ~6 minutes).

    make bench                          # all of them
    .venv/bin/python bench/summary.py --only answerer_calls,pipeline
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MODEL = "artifacts/sft-model"


@dataclass(frozen=True)
class Bench:
    """One benchmark: its name, the arguments after `python`, and the target of its ratio."""

    name: str
    args: tuple[str, ...]
    target: str
    meaning: str

    @property
    def command(self) -> str:
        return "python " + " ".join(self.args)


BENCHES = (
    Bench("episode_runner", ("bench/episode_runner.py", "--model", MODEL), ">= 0.8",
          "episode runner tok/s / raw vLLM engine tok/s"),
    Bench("reward_pool", ("bench/reward_pool.py",), "> 1 (1.9 idle)",
          "episodes/s with 2 reward actors / with 1"),
    Bench("learner_prefix", ("bench/learner_prefix.py", "--model", MODEL, "experiment=demo"), "> 1",
          "GRPO step seconds, full sequences / shared prefix"),
    Bench("answerer_calls", ("bench/answerer_calls.py", "--model", MODEL), ">= 2",
          "answerer calls per demo batch, cache off / on"),
    Bench("pipeline", ("bench/pipeline.py", "--model", MODEL), "> 1 (verl: 1.23-1.40)",
          "8-step run wall, synchronous / one step off"),
    Bench("peer_trl", ("bench/peer_trl.py", "--model", MODEL), ">= 1",
          "optimizer steps/min, finemem / TRL GRPOTrainer"),
)

RATIO_RE = re.compile(r"^ratio:\s*([-+0-9.eE]+|nan|inf)\s*$")


def last_ratio(output: str) -> str | None:
    """The value of the last `ratio: X` line of a benchmark's output, or None."""
    found = None
    for line in output.splitlines():
        m = RATIO_RE.match(line.strip())
        if m:
            found = m.group(1)
    return found


def run_one(bench: Bench) -> tuple[str | None, int, float]:
    """Run `bench`, echoing its output; returns (ratio or None, exit code, seconds)."""
    print(f"\n=== {bench.name}: {bench.command} ===", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *bench.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    rc = proc.wait()
    return last_ratio("".join(lines)), rc, time.perf_counter() - start


def ensure_warm_start() -> None:
    """Build the demo's data, tiny policy and warm start when `artifacts/sft-model` is missing."""
    if (Path(MODEL) / "config.json").is_file():
        return
    from finemem.config import load_config
    from learner.prepare import prepare_warm_start

    print(f"{MODEL} is missing: building the demo's warm start first (as `make demo` does)")
    prepare_warm_start(load_config(["experiment=demo"]), Path("artifacts"), ["experiment=demo"], numbered=(1, 3))


def table(rows: list[tuple[Bench, str | None, int, float]]) -> str:
    out = ["| benchmark | ratio | target | what the ratio is | command | minutes |", "|---|---|---|---|---|---|"]
    for bench, ratio, rc, seconds in rows:
        shown = ratio if ratio is not None and rc == 0 else f"failed (exit {rc})" if rc else "no ratio printed"
        out.append(f"| {bench.name} | {shown} | {bench.target} | {bench.meaning} | `{bench.command}` | "
                   f"{seconds / 60:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {b.name for b in BENCHES})
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(b.name for b in BENCHES)}")
    chosen = [b for b in BENCHES if not names or b.name in names]
    os.environ.setdefault("WANDB_MODE", "disabled")
    if any(MODEL in b.args for b in chosen):
        ensure_warm_start()
    rows = [(b, *run_one(b)) for b in chosen]
    print("\n" + table(rows))
    return 0 if all(rc == 0 and ratio is not None for _, ratio, rc, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
