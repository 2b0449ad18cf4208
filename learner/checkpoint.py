"""Checkpoint layout in a run directory, completion marker, content manifest, retention, RNG capture.

    <run_dir>/ckpt/step_000010/
        deepspeed/        DeepSpeed engine state (weights, optimizer, lr scheduler; one shard per rank)
        hf/               the policy as a Hugging Face folder (config, safetensors, tokenizer files)
        state.json        step, policy version, the caller's client state (data-order cursor, ...),
                          and the RNG states of python / numpy / torch of every rank
        MANIFEST.json     size and sha256 of every file above
        COMPLETE          written last

A checkpoint is written into `step_000010.partial/`; `finish_checkpoint` fsyncs every file, writes
the manifest, checks it, writes `COMPLETE` and only then renames the folder to `step_000010/`. So a
crash or a full disk mid-write leaves a `.partial` folder that is never resumed from (and is
removed by the next save), and a marked checkpoint whose file was later truncated or altered is
caught by `verify_checkpoint`: sizes on every listing (a stat), sha256 when resuming
(`find_checkpoint(checksums=True)`). Resuming skips a broken newest checkpoint for the previous
intact one and says which. Every rank must see the same file system (a shared run dir).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from finemem.tracking import describe_write_error

CKPT_DIR = "ckpt"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE_FILE = "state.json"
_STEP_RE = re.compile(r"^step_(\d{6,})(\.partial)?$")
_HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: files hash in parallel


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the message names the path and the OS error)."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    """The final folder of the checkpoint of `step`."""
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def partial_dir(run_dir: str | Path, step: int) -> Path:
    """The folder a checkpoint is written into before it is complete."""
    return step_dir(run_dir, step).with_name(f"step_{step:06d}.partial")


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A fresh, empty `.partial` folder for `step` (a leftover one is removed)."""
    path = partial_dir(run_dir, step)
    try:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as err:
        raise CheckpointError(f"checkpoint step {step}: {describe_write_error(path, err)}") from err
    return path


def abandon_checkpoint(run_dir: str | Path, step: int) -> None:
    """Remove `step`'s `.partial` folder after a failed save (it is never resumed from; this frees its space)."""
    shutil.rmtree(partial_dir(run_dir, step), ignore_errors=True)


def finish_checkpoint(run_dir: str | Path, step: int, keep: int | None = None) -> Path:
    """Make `step`'s partial checkpoint durable and complete, move it into place, apply retention.

    Order: fsync every file, write MANIFEST.json (sizes, sha256), check the folder against it,
    write COMPLETE, rename to `step_XXXXXX/`, fsync the parent. A failure at any point leaves
    no marked checkpoint and raises `CheckpointError` naming the path and the errno.
    """
    src, dst = partial_dir(run_dir, step), step_dir(run_dir, step)
    if not (src / STATE_FILE).is_file():
        raise FileNotFoundError(f"finish_checkpoint: {src / STATE_FILE} is missing; the checkpoint was not written")
    target = src
    try:
        manifest = write_manifest(src)
        problem = _check_files(src, manifest, checksums=False) or _check_state(src)
        if problem:
            raise CheckpointError(f"checkpoint step {step}: {src} failed its check after writing: {problem}")
        target = src / COMPLETE
        _write_synced(target, f"{step}\n")
        _fsync_dir(src)
        old = dst.with_name(dst.name + ".replaced")
        if dst.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            target = dst
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        target = dst
        os.replace(src, dst)
        _fsync_dir(dst.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise CheckpointError(f"checkpoint step {step}: {describe_write_error(target, err)}") from err
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return dst


def write_manifest(path: str | Path) -> dict[str, dict[str, Any]]:
    """fsync every file under `path` and write MANIFEST.json: {relative path: {size, sha256}}."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE))

    def entry(p: Path) -> tuple[str, dict[str, Any]]:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        return p.relative_to(path).as_posix(), {"size": p.stat().st_size, "sha256": _sha256(p)}

    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        manifest = dict(pool.map(entry, files))
    for d in {p.parent for p in files} | {path}:
        _fsync_dir(d)
    tmp = path / (MANIFEST + ".tmp")
    _write_synced(tmp, json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path / MANIFEST)
    return manifest


def verify_checkpoint(path: str | Path, checksums: bool = False) -> str | None:
    """None when `path` is a complete, intact checkpoint; otherwise what is wrong with it.

    Sizes are always compared with the manifest (catches a truncated or missing file); with
    `checksums` every file is read and its sha256 compared too. A marked checkpoint without a
    manifest (written before manifests existed) is accepted when its state.json reads.
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return f"no {COMPLETE} marker (the save did not finish)"
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            return f"{MANIFEST} unreadable ({err})"
        problem = _check_files(path, manifest, checksums)
        if problem:
            return problem
    return _check_state(path)


def _check_files(path: Path, manifest: dict[str, dict[str, Any]], checksums: bool) -> str | None:
    for rel, want in manifest.items():
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want["size"]:
            return f"{rel} is {size} bytes, {want['size']} expected (truncated or rewritten)"
    if checksums:
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            digests = dict(zip(manifest, pool.map(lambda rel: _sha256(path / rel), manifest)))
        for rel, want in manifest.items():
            if digests[rel] != want["sha256"]:
                return f"{rel} does not match its sha256 (corrupt)"
    return None


def _check_state(path: Path) -> str | None:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} unreadable ({type(err).__name__}: {err})"
    return None if isinstance(state, dict) else f"{STATE_FILE} is not a JSON object"


def _candidates(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `step_N` and `step_N.partial` folder as (step, path), oldest first (partial after final)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), bool(match.group(2)), path))
    return [(step, path) for step, _, path in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints whose files have their manifest sizes, as (step, path), oldest first."""
    return [(step, path) for step, path in _candidates(run_dir)
            if not path.name.endswith(".partial") and verify_checkpoint(path) is None]


def find_checkpoint(run_dir: str | Path, checksums: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint, and every newer folder that was passed over with the reason.

    Walks from the newest step down; a `.partial` folder, a folder without the marker, a file
    that is missing, truncated or (with `checksums`) altered makes it look further back.
    """
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(_candidates(run_dir)):
        if path.name.endswith(".partial"):
            skipped.append((path, "unfinished save (.partial)"))
            continue
        problem = verify_checkpoint(path, checksums=checksums)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_checkpoint(run_dir: str | Path, checksums: bool = False) -> Path | None:
    """The newest complete, intact checkpoint of the run, or None (see `find_checkpoint`)."""
    return find_checkpoint(run_dir, checksums=checksums)[0]


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest `keep` intact checkpoints (keep <= 0 keeps all); remove stale `.partial`s and
    broken checkpoints older than the newest intact one (neither can ever be resumed from).

    Returns the removed folders.
    """
    removed = []
    complete = list_checkpoints(run_dir)
    if keep > 0:
        for _, path in complete[:-keep]:
            shutil.rmtree(path)
            removed.append(path)
    newest = complete[-1][0] if complete else -1
    intact = {path for _, path in complete}
    for step, path in _candidates(run_dir):
        if step <= newest and path not in intact and path.exists():  # an abandoned or damaged write
            shutil.rmtree(path)
            removed.append(path)
    return removed


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state.json` into a checkpoint folder (atomically: temp file, fsync, then rename)."""
    target = Path(path) / STATE_FILE
    tmp = target.with_suffix(".json.tmp")
    try:
        _write_synced(tmp, json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, target)
    except OSError as err:
        raise CheckpointError(describe_write_error(tmp, err)) from err


def read_state(path: str | Path) -> dict[str, Any]:
    """Read a complete checkpoint's `state.json`; refuses an incomplete folder."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    return json.loads((path / STATE_FILE).read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states as JSON-able values."""
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


def _bytes_tensor(text: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()
