"""The artifacts every CPU experiment starts from: seeded synthetic data, the tiny policy, and its
supervised warm start. `make demo` and `finemem ablation` both build them here, so they are built
the same way; a folder that already holds one is reused (and said so), never rebuilt behind the
user's back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class WarmStart:
    """Where the prepared artifacts are, and the seconds each stage took (0 when reused)."""

    train_path: Path
    eval_path: Path
    base_model: Path
    sft_model: Path
    seconds: dict[str, float] = field(default_factory=dict)


def stage(title: str) -> float:
    """Print a stage header (the long CPU jobs are read stage by stage); returns its start time."""
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


class PrepareError(RuntimeError):
    """A preparation command failed (it printed why)."""


def prepare_data(cfg, title: str) -> tuple[Path, Path]:
    """The seeded synthetic train and held-out files at `cfg.data.train_path` / `eval_path`
    (different seeds, so held-out instances are unseen), generated unless present."""
    from finemem.data.readers import write_jsonl
    from finemem.data.synth import generate_instances

    stage(title)
    train_path, eval_path = Path(cfg.data.train_path), Path(cfg.data.eval_path)
    for path, want, seed in ((train_path, cfg.data.synth_train_instances, cfg.data.synth_train_seed),
                             (eval_path, cfg.data.synth_eval_instances, cfg.data.synth_eval_seed)):
        if not path.is_file():
            write_jsonl(generate_instances(want, seed, cfg.data), path)
            continue
        with open(path, encoding="utf-8") as f:
            have = sum(1 for line in f if line.strip())
        if have != want:  # kept from an earlier run or preset: say so, never overwrite a user's file
            print(f"NOTE: {path} holds {have} instances, the config asks {want}; delete it to regenerate")
    print(f"train {train_path} (seed {cfg.data.synth_train_seed}), held-out {eval_path} "
          f"(seed {cfg.data.synth_eval_seed})")
    return train_path, eval_path


def prepare_warm_start(cfg, art: Path, config_args: list[str], numbered: tuple[int, int] = (1, 5)) -> WarmStart:
    """Data at `cfg.data.train_path`/`eval_path`, the tiny policy at `art/tiny-model` and its warm
    start at `art/sft-model`. `config_args` (`experiment=...` and overrides) are what `finemem model
    init` and `finemem sft` are called with, so both see the caller's config. `numbered` is the
    (first stage number, total stages) of the caller's progress headers."""
    first, total = numbered
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    train_path, eval_path = prepare_data(cfg, f"{first}/{total} synthetic data")
    seconds["data"] = time.perf_counter() - t

    t = stage(f"{first + 1}/{total} tiny tokenizer and Qwen3 policy")
    base, sft_dir = art / "tiny-model", art / "sft-model"
    if not (base / "config.json").is_file():
        from finemem.model_init import cli as model_init_cli

        if model_init_cli(["--out", str(base), *config_args]) != 0:
            raise PrepareError(f"finemem model init --out {base} failed")
    else:
        print(f"reusing {base}")
    seconds["model_init"] = time.perf_counter() - t

    t = stage(f"{first + 2}/{total} supervised warm start (noisy scripted teacher)")
    if not (sft_dir / "config.json").is_file():
        from learner.sft import cli as sft_cli

        if sft_cli(["--model", str(base), "--out", str(sft_dir), *config_args]) != 0:
            raise PrepareError(f"finemem sft --model {base} --out {sft_dir} failed")
    else:
        print(f"reusing {sft_dir}")
    seconds["sft"] = time.perf_counter() - t
    return WarmStart(train_path, eval_path, base, sft_dir, seconds)
