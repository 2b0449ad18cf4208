"""Run directories, metrics logging (jsonl + Weights & Biases), and plots.

Every long job writes a run directory so nothing computed is lost:

    <out_dir>/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml      the resolved config (what `resume=` reloads)
        metrics.jsonl    one json object per logged step
        ckpt/            checkpoints (see learner/checkpoint.py)
        plots/           learning curves (png)

W&B runs offline by default (no key needed, CI safe); it goes online only when the user sets
`wandb.mode=online` or exports WANDB_MODE=online. wandb is imported only when a Tracker starts.

Storage faults: a run directory that cannot be created or written fails when `RunDir` opens it
(before any service starts) with `RunDirError`; a write that fails later (disk full) raises
`RunDirWriteError` naming the file, the errno and the free space left there.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from finemem.config import ConfigError


class RunDirError(ConfigError):
    """The run directory cannot be created or written: nothing has started yet."""


class RunDirWriteError(OSError):
    """A write into the run directory failed mid-run (disk full, read-only, ...)."""

    def __init__(self, path: str | Path, err: OSError) -> None:
        super().__init__(describe_write_error(path, err))
        self.errno = err.errno  # str() stays the one-line message


def describe_write_error(path: str | Path, err: BaseException) -> str:
    """`cannot write PATH: [Errno 28 ENOSPC] No space left on device (12 KiB free there)`.

    For errors that carry no errno (torch.save reports a full disk as a RuntimeError) the free
    space says what the error text may not.
    """
    if isinstance(err, OSError) and err.errno:
        what = f"[Errno {err.errno} {errno.errorcode.get(err.errno, '?')}] {err.strerror or os.strerror(err.errno)}"
        space = err.errno in (errno.ENOSPC, errno.EDQUOT)
    else:
        what = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        space = True
    return f"cannot write {path}: {what}{_free_space(path) if space else ''}"


def _free_space(path: str | Path) -> str:
    p = Path(path)
    while not p.is_dir() and p != p.parent:  # the nearest existing folder
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f" ({free:.0f} {unit} free there)" if unit == "B" else f" ({free:.1f} {unit} free there)"
        free /= 1024
    return ""


class RunDir:
    """A run directory: created fresh, or reopened for `resume=`. Checked writable when opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        target = self.path
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for sub in ("ckpt", "plots"):
                target = self.path / sub
                target.mkdir(exist_ok=True)
            target = self.path
            self.check_writable()
        except OSError as err:
            raise RunDirError(
                f"run directory {self.path}: {describe_write_error(target, err)}; "
                "use a writable run.out_dir (or free space there)"
            ) from err

    def check_writable(self) -> None:
        """Write, fsync and remove a small file in the run dir and in ckpt/ (raises OSError)."""
        for folder in (self.path, self.path / "ckpt"):
            probe = folder / f".write-test-{os.getpid()}"
            try:
                with open(probe, "wb") as f:
                    f.write(b"finemem" * 512)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                if probe.is_file():
                    probe.unlink()
                raise
            probe.unlink()

    @classmethod
    def create(cls, out_dir: str | Path, name: str) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(out_dir) / f"{name}-{stamp}"
        n = 1
        while path.exists():
            path = Path(out_dir) / f"{name}-{stamp}-{n}"
            n += 1
        return cls(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "ckpt"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return v.item()
    return v


TIMING_PREFIXES = (
    "time/",  # wall-clock seconds of the step's phases
    "throughput/",  # tokens per wall-clock second
    "queue/",  # batch-queue depth when the learner took a batch: how far the producer got meanwhile
    "reward_pool/",  # live counters read at log time, while the producer may already score the next batch
    # answerer calls and request-cache hits: which reward actor scored an episode decides what its
    # cache already held (the rewards do not depend on it)
    "answerer/",
    "reward_stats/answer_calls",
    "reward_stats/answer_cache_hits",
)


def timing_dependent(key: str) -> bool:
    """True for metrics.jsonl keys that depend on wall-clock time or thread timing, not on the seed.

    Everything else (rewards, advantages, losses, policy versions, batch stats) is a function of the
    config and `run.seed`: two runs with both equal log the same values for it (tests/test_determinism.py).
    Timing-dependent: the row's `time` stamp, the `TIMING_PREFIXES` groups, and any key measured in
    seconds (`*_s`, e.g. `learner/step_time_s`).
    """
    return key == "time" or key.startswith(TIMING_PREFIXES) or key.endswith("_s")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class Tracker:
    """Logs flat metric dicts to metrics.jsonl and (if enabled) to W&B under the same step."""

    def __init__(self, run_dir: RunDir, config: dict[str, Any], wandb_cfg: Any | None = None, resume: bool = False):
        self.run_dir = run_dir
        self._wandb = None
        try:
            self._file = open(run_dir.metrics_path, "a" if resume else "w", buffering=1)  # noqa: SIM115 (closed in close())
        except OSError as err:
            raise RunDirWriteError(run_dir.metrics_path, err) from err
        mode = os.environ.get("WANDB_MODE") or (wandb_cfg.mode if wandb_cfg is not None else "offline")
        if mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(
                    project=getattr(wandb_cfg, "project", "finemem"),
                    entity=getattr(wandb_cfg, "entity", None),
                    name=run_dir.path.name,
                    dir=str(run_dir.path),
                    config=config,
                    mode=mode,
                    tags=list(getattr(wandb_cfg, "tags", []) or []),
                    group=getattr(wandb_cfg, "group", None),
                    resume="allow" if resume else None,
                    id=run_dir.path.name.replace(".", "-"),
                )
            except Exception as e:  # noqa: BLE001 (W&B must never take a training run down)
                print(f"finemem: W&B disabled ({type(e).__name__}: {e})")
                self._wandb = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")  # line-buffered: a full disk fails here
        except OSError as err:
            raise RunDirWriteError(self.run_dir.metrics_path, err) from err
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step)

    def log_extra(self, metrics: dict[str, Any], step: int) -> None:
        """Metrics W&B shows next to the step's row, kept out of metrics.jsonl (one row per training
        step there): the held-out curve, which the run directory keeps in eval_curve.jsonl."""
        if self._wandb is not None:
            self._wandb.log({k: _jsonable(v) for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:  # the last buffered line could not be flushed
            print(f"finemem: {describe_write_error(self.run_dir.metrics_path, err)}")
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def plot_curves(metrics_path: str | Path, out_png: str | Path, keys: list[str], title: str = "") -> Path | None:
    """Plot the given metric keys against step from a metrics.jsonl; returns the png path (or None)."""
    rows = read_metrics(metrics_path)
    series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.4 * len(series)), sharex=True, squeeze=False)
    for ax, (k, pts) in zip(axes[:, 0], series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_ylabel(k, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
