"""Checkpoint layout in a run directory, completion marker, retention, and RNG capture.

    <run_dir>/ckpt/step_000010/
        deepspeed/        DeepSpeed engine state (weights, optimizer, lr scheduler; one shard per rank)
        hf/               the policy as a Hugging Face folder (config, safetensors, tokenizer files)
        state.json        step, policy version, the caller's client state (data-order cursor, ...),
                          and the RNG states of python / numpy / torch of every rank
        COMPLETE          written last

A checkpoint is written into `step_000010.partial/` and renamed to `step_000010/` only after
`COMPLETE` is in it, so a crash mid-write leaves a `.partial` folder that is never resumed from
(and is removed by the next save). Every rank must see the same file system (a shared run dir).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

CKPT_DIR = "ckpt"
COMPLETE = "COMPLETE"
STATE_FILE = "state.json"
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    """The final folder of the checkpoint of `step`."""
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def partial_dir(run_dir: str | Path, step: int) -> Path:
    """The folder a checkpoint is written into before it is complete."""
    return step_dir(run_dir, step).with_name(f"step_{step:06d}.partial")


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A fresh, empty `.partial` folder for `step` (a leftover one is removed)."""
    path = partial_dir(run_dir, step)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def finish_checkpoint(run_dir: str | Path, step: int, keep: int | None = None) -> Path:
    """Mark `step`'s partial checkpoint complete, move it into place, then apply retention."""
    src, dst = partial_dir(run_dir, step), step_dir(run_dir, step)
    if not (src / STATE_FILE).is_file():
        raise FileNotFoundError(f"finish_checkpoint: {src / STATE_FILE} is missing; the checkpoint was not written")
    marker = src / COMPLETE
    with open(marker, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    if dst.exists():  # re-saving a step (e.g. after a resume): replace the old copy
        shutil.rmtree(dst)
    os.replace(src, dst)
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return dst


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and path.is_dir() and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (keep <= 0 keeps all); remove stale `.partial`s.

    Returns the removed folders.
    """
    removed = []
    complete = list_checkpoints(run_dir)
    if keep > 0:
        for _, path in complete[:-keep]:
            shutil.rmtree(path)
            removed.append(path)
    root = Path(run_dir) / CKPT_DIR
    newest = complete[-1][0] if complete else -1
    for path in root.glob("step_*.partial"):
        step = int(path.name[len("step_"): -len(".partial")])
        if step <= newest:  # older than a complete checkpoint: an abandoned write
            shutil.rmtree(path)
            removed.append(path)
    return removed


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state.json` into a checkpoint folder (atomically: temp file, then rename)."""
    target = Path(path) / STATE_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, target)


def read_state(path: str | Path) -> dict[str, Any]:
    """Read a complete checkpoint's `state.json`; refuses an incomplete folder."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    return json.loads((path / STATE_FILE).read_text())


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
