"""Storage faults: a partial or corrupt newest checkpoint, a run directory that cannot be written,
a disk that fills.

- Resume passes over a newest checkpoint without its COMPLETE marker, with a truncated file
  (manifest sizes) or an altered one (manifest sha256) and takes the previous intact one.
- A run directory that cannot be created or written fails in `RunDir` (so in `build_config`,
  before any service starts) naming the path and the errno.
- A full disk (a real 1-4 MiB tmpfs where mounting is permitted; otherwise skipped saying so,
  plus an injected ENOSPC at the edge) fails the metrics write or the checkpoint save naming the
  path and the errno, and never leaves a checkpoint marked complete.

Heavy tests (real DeepSpeed learner on local Ray):
`flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest -m heavy tests/test_faults_storage.py`.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from finemem.config import ConfigError, load_config, to_container
from finemem.tracking import RunDir, RunDirError, RunDirWriteError, Tracker
from learner import checkpoint as ck
from learner.checkpoint import (
    MANIFEST,
    CheckpointError,
    begin_checkpoint,
    find_checkpoint,
    finish_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    partial_dir,
    prune_checkpoints,
    step_dir,
    verify_checkpoint,
    write_state,
)


def _save(run, step: int, shard_bytes: int = 4000, keep: int | None = None) -> Path:
    """A checkpoint shaped like the learner's: a binary shard, an hf file, state.json."""
    path = begin_checkpoint(run, step)
    (path / "deepspeed").mkdir()
    (path / "deepspeed" / "optim_states.pt").write_bytes(os.urandom(shard_bytes))
    (path / "hf").mkdir()
    (path / "hf" / "config.json").write_text(json.dumps({"step": step}))
    write_state(path, {"step": step, "client_state": {"step": step}})
    return finish_checkpoint(run, step, keep=keep)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# ---- pure: partial / corrupt newest checkpoint ------------------------------------------------------
def test_manifest_is_written_before_the_marker_and_lists_every_file(tmp_path):
    ckpt = _save(tmp_path, 1)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert set(manifest) == {"deepspeed/optim_states.pt", "hf/config.json", "state.json"}
    assert manifest["deepspeed/optim_states.pt"]["size"] == 4000
    assert all(len(v["sha256"]) == 64 for v in manifest.values())
    assert (ckpt / ck.COMPLETE).is_file() and verify_checkpoint(ckpt, checksums=True) is None


def test_newest_without_marker_is_passed_over_naming_both(tmp_path):
    good = _save(tmp_path, 10)
    half = begin_checkpoint(tmp_path, 20)  # a crash mid-save: still .partial
    write_state(half, {"step": 20})
    unmarked = step_dir(tmp_path, 15)  # renamed by hand (or an old bug) without the marker
    unmarked.mkdir()
    (unmarked / "state.json").write_text("{}")
    found, skipped = find_checkpoint(tmp_path, checksums=True)
    assert found == good
    assert [(p.name, why) for p, why in skipped] == [
        ("step_000020.partial", "unfinished save (.partial)"),
        ("step_000015", "no COMPLETE marker (the save did not finish)"),
    ]


def test_truncated_file_in_a_marked_checkpoint_is_detected(tmp_path):
    good = _save(tmp_path, 10)
    bad = _save(tmp_path, 20)
    _truncate(bad / "deepspeed" / "optim_states.pt", 1000)
    assert (bad / ck.COMPLETE).is_file()  # marked complete, but a file lost its tail
    assert verify_checkpoint(bad) == "deepspeed/optim_states.pt is 1000 bytes, 4000 expected (truncated or rewritten)"
    assert latest_checkpoint(tmp_path) == good
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    (bad / "hf" / "config.json").unlink()
    assert verify_checkpoint(bad).startswith("deepspeed/optim_states.pt")  # first problem reported
    _truncate(bad / "state.json", 0)
    found, skipped = find_checkpoint(tmp_path)
    assert found == good and skipped[0][0] == bad


def test_same_size_corruption_needs_the_checksums(tmp_path):
    good = _save(tmp_path, 10)
    bad = _save(tmp_path, 20)
    shard = bad / "deepspeed" / "optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[123] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert find_checkpoint(tmp_path)[0] == bad  # sizes alone cannot see it
    found, skipped = find_checkpoint(tmp_path, checksums=True)  # what resume uses
    assert found == good
    assert skipped == [(bad, "deepspeed/optim_states.pt does not match its sha256 (corrupt)")]


def test_no_marker_and_truncated_together_fall_back_two_steps(tmp_path):
    good = _save(tmp_path, 10)
    truncated = _save(tmp_path, 20)
    _truncate(truncated / "hf" / "config.json", 1)
    half = begin_checkpoint(tmp_path, 30)
    write_state(half, {"step": 30})
    found, skipped = find_checkpoint(tmp_path, checksums=True)
    assert found == good
    assert [p for p, _ in skipped] == [half, truncated]
    assert "truncated" in skipped[1][1]
    # every checkpoint broken: nothing to resume from, and the reasons are there
    _truncate(good / "state.json", 3)
    assert find_checkpoint(tmp_path, checksums=True)[0] is None


def test_trainer_resume_says_in_one_line_which_checkpoint_it_passed_over(tmp_path, capsys):
    from learner.trainer import Trainer

    run = RunDir(tmp_path / "run")
    good = _save(run.path, 10)
    bad = _save(run.path, 20)
    _truncate(bad / "state.json", 5)
    trainer = Trainer(load_config([]), run, resume=True)
    assert trainer._resume_checkpoint() == good  # what start() resumes from, before any service starts
    size = json.loads((bad / MANIFEST).read_text())["state.json"]["size"]
    expected = (f"finemem: resume: newest checkpoint {bad} is unusable (state.json is 5 bytes, {size} expected "
                f"(truncated or rewritten)); resuming from {good} instead")
    assert capsys.readouterr().out.strip().splitlines() == [expected]
    _truncate(good / "state.json", 5)
    with pytest.raises(ConfigError, match=r"no complete checkpoint under .*step_000020: state.json is 5 bytes"):
        trainer._resume_checkpoint()


def test_checkpoint_written_before_manifests_is_still_accepted(tmp_path):
    legacy = step_dir(tmp_path, 5)
    legacy.mkdir(parents=True)
    (legacy / "state.json").write_text(json.dumps({"step": 5}))
    (legacy / ck.COMPLETE).write_text("5\n")
    assert latest_checkpoint(tmp_path, checksums=True) == legacy


def test_retention_counts_intact_checkpoints_and_drops_damaged_older_ones(tmp_path):
    a = _save(tmp_path, 1)
    b = _save(tmp_path, 2)
    _truncate(b / "deepspeed" / "optim_states.pt", 10)
    _save(tmp_path, 3, keep=2)  # a and step 3 are the two intact ones; damaged b can never be resumed
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 3]
    assert a.exists() and not b.exists()


# ---- disk full / read-only: clear errors at the failing write ---------------------------------------
def test_run_dir_that_cannot_be_created_fails_before_anything_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match=r"a-file/runs.*\[Errno 20 ENOTDIR\] Not a directory") as info:
        RunDir.create(blocker / "runs", "t")
    assert isinstance(info.value, ConfigError)  # the CLI prints it as one `finemem: config error:` line
    with pytest.raises(RunDirError, match=r"/dev/null/x.*ENOTDIR"):
        RunDir("/dev/null/x")


def test_build_config_checks_the_run_dir_before_any_service(tmp_path):
    from learner.trainer import build_config

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="use a writable run.out_dir"):
        build_config([f"run.out_dir={blocker}", "run.name=t"])


def test_checkpoint_save_with_disk_full_at_the_marker_marks_nothing(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)
    real = ck._write_synced

    def full_at_marker(path, text):  # the edge: the OS refuses the COMPLETE marker's write
        if path.name == ck.COMPLETE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(ck, "_write_synced", full_at_marker)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, 2)
    assert str(info.value).startswith(f"checkpoint step 2: cannot write {partial_dir(tmp_path, 2) / ck.COMPLETE}: "
                                      "[Errno 28 ENOSPC] No space left on device (")
    assert not step_dir(tmp_path, 2).exists()
    assert latest_checkpoint(tmp_path) == good


@pytest.fixture
def small_disk(tmp_path):
    """A real tiny file system (tmpfs); the test is skipped where mounting is not permitted."""

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{size}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs for a real ENOSPC (needs root or CAP_SYS_ADMIN): "
                        f"{done.stderr.strip()}")
        mounted.append(where)
        return where

    mounted: list[Path] = []
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> None:
    """Take every free byte of `disk`."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for block in (65536, 512, 1):  # down to the last byte
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as err:
                assert err.errno == errno.ENOSPC


def test_full_disk_fails_run_dir_creation_naming_path_and_errno(small_disk):
    disk = small_disk("1m")
    _fill(disk)
    with pytest.raises(RunDirError, match=r"\[Errno 28 ENOSPC\] No space left on device \(0 B free there\)"):
        RunDir.create(disk, "t")


def test_full_disk_fails_the_metrics_write_naming_path_and_errno(small_disk, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    disk = small_disk("1m")
    run = RunDir.create(disk, "t")
    tracker = Tracker(run, to_container(load_config()), None)
    tracker.log({"reward/mean": 0.5}, step=1)
    _fill(disk)
    with pytest.raises(RunDirWriteError) as info:
        for step in range(2, 200):  # one line may still fit in the last page
            tracker.log({"reward/mean": 0.5, "pad": "x" * 2000}, step=step)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"cannot write {run.metrics_path}: [Errno 28 ENOSPC] No space left on device")
    tracker.close()  # closing after the failure does not raise


def test_full_disk_during_a_pure_checkpoint_save_marks_nothing(small_disk):
    disk = small_disk("1m")
    run = RunDir.create(disk, "t")
    good = _save(run.path, 1, shard_bytes=100_000)
    with pytest.raises(OSError, match="No space left"):  # the caller's own write fails, as DeepSpeed's would
        _save(run.path, 2, shard_bytes=2_000_000)
    ck.abandon_checkpoint(run.path, 2)  # what the learner does after a failed save
    assert not step_dir(run.path, 2).exists() and not partial_dir(run.path, 2).exists()
    assert latest_checkpoint(run.path, checksums=True) == good
    assert prune_checkpoints(run.path, keep=2) == []


# ---- heavy: the real DeepSpeed learner ------------------------------------------------------------


def _tiny_model(tmp_path_factory):
    import torch
    from helpers_tokenizer import build_test_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen3")
    tok = build_test_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out, len(tok)


@pytest.mark.heavy
def test_real_learner_disk_full_then_resume_past_a_truncated_checkpoint(ray_local, tmp_path_factory, small_disk):
    """A real DeepSpeed save hits a real ENOSPC (tmpfs): one error naming the path, nothing marked,
    the learner keeps working; then a truncated newest checkpoint is passed over on resume."""
    from test_learner import _batch, _cfg

    from learner.actor import LearnerGroup

    ray = ray_local
    model_dir, vocab = _tiny_model(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("run")
    group = LearnerGroup(_cfg(model_dir, keep_checkpoints=0))
    try:
        group.train_step(_batch(1, vocab))
        first = Path(group.save_checkpoint(str(run_dir), {"step": 1}))
        full = small_disk("256k")  # less than one checkpoint of the tiny model
        with pytest.raises(Exception) as info:  # Ray wraps the worker's CheckpointError
            group.save_checkpoint(str(full), {"step": 1})
        err = getattr(info.value, "cause", info.value)
        assert isinstance(err, CheckpointError), info.value
        text = str(err)
        print(f"\nreal ENOSPC in a DeepSpeed save: {text}")
        assert text.startswith("checkpoint step 1: cannot write ") and str(partial_dir(full, 1)) in text and ("ENOSPC" in text or "free there" in text), text
        assert not step_dir(full, 1).exists() and not partial_dir(full, 1).exists()  # nothing half-written kept
        assert latest_checkpoint(full) is None

        group.train_step(_batch(2, vocab))  # the learner is still usable after the failed save
        second = Path(group.save_checkpoint(str(run_dir), {"step": 2}))
        after_two = ray.get(group.export_weights())
    finally:
        group.shutdown()
    assert verify_checkpoint(first, checksums=True) is None and verify_checkpoint(second, checksums=True) is None
    shard = max((second / "deepspeed").rglob("*.pt"), key=lambda p: p.stat().st_size)
    _truncate(shard, shard.stat().st_size // 2)

    fresh = LearnerGroup(_cfg(model_dir))
    try:
        client = fresh.load_checkpoint(str(run_dir))  # the run dir: its newest intact checkpoint
        version = fresh.policy_version()
        with pytest.raises(Exception, match="truncated"):  # Ray's task error
            fresh.load_checkpoint(str(second))  # named explicitly: refused, not loaded half
    finally:
        fresh.shutdown()
    assert client == {"step": 1} and version == 1  # back one checkpoint, not a half-loaded step 2
    assert after_two
