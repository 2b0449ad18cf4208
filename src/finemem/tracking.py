"""Run directories, metrics logging (jsonl + Weights & Biases), and plots.

Every long job writes a run directory so nothing computed is lost:

    <out_dir>/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml      the resolved config (what `resume=` reloads)
        metrics.jsonl    one json object per logged step
        ckpt/            checkpoints (see learner/checkpoint.py)
        plots/           learning curves (png)

W&B runs offline by default (no key needed, CI safe); it goes online only when the user sets
`wandb.mode=online` or exports WANDB_MODE=online. wandb is imported only when a Tracker starts.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


class RunDir:
    """A run directory: created fresh, or reopened for `resume=`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "ckpt").mkdir(exist_ok=True)
        (self.path / "plots").mkdir(exist_ok=True)

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
        self._file = open(run_dir.metrics_path, "a" if resume else "w", buffering=1)  # noqa: SIM115 (closed in close())
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
                    resume="allow" if resume else None,
                    id=run_dir.path.name.replace(".", "-"),
                )
            except Exception as e:  # noqa: BLE001 (W&B must never take a training run down)
                print(f"finemem: W&B disabled ({type(e).__name__}: {e})")
                self._wandb = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step)

    def close(self) -> None:
        self._file.close()
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
