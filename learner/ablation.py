"""`finemem ablation`: the paper's reward ablation (outcome-only, +CSR, +EARA, Fine-Mem) over seeds.

One warm start is built (or reused) and every (preset, seed) run starts from it with the identical
config except `reward.preset` (and the seed). A seed fixes the data order (the instance sampler is
seeded by `run.seed` alone), so the presets are compared on the same batches: the comparison is
paired, and `table.json` records whether the data orders really matched. Finished runs leave a
`RESULT.json`; running the same command again skips them, so a killed ablation continues.

Output in `--out`: `runs/<preset>-seed<k>/` (each a normal run directory), `table.md`,
`table.json`, `curves.png` (held-out accuracy and memory tokens against step, the mean over seeds
with a min-max band) and one W&B group (offline by default), each run tagged with preset and seed.

The held-out curve comes from `eval.every`: the trainer evaluates the engines' current policy every
K steps, as well as before and after training. The step-0 point is the warm start itself: the same
policy, held-out set and sampling seed under every preset, so it is evaluated once per seed (by that
seed's first preset) and shared.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any

PRESETS = ("outcome_only", "csr_only", "eara_only", "finemem")
LABELS = {"outcome_only": "outcome-only", "csr_only": "+CSR", "eara_only": "+EARA", "finemem": "Fine-Mem"}
# Fine-Mem paper, ablation table: average score and memory tokens (Qwen3-4B manager).
PAPER = {"outcome_only": (0.627, "92.4K"), "csr_only": (0.639, "86.2K"), "eara_only": (0.622, "60.7K"),
         "finemem": (0.663, "79.1K")}
RESULT_FILE = "RESULT.json"


# ------------------------------------------------------------------------------ pure aggregation
def mean_curve(curves: list[list[dict[str, Any]]], key: str) -> list[tuple[int, float, float, float]]:
    """(step, mean, min, max) of `key` over seeds, at the steps every seed's curve has."""
    if not curves:
        return []
    steps = sorted(set.intersection(*[{p["step"] for p in c} for c in curves]))
    out = []
    for step in steps:
        values = [next(p[key] for p in c if p["step"] == step) for c in curves]
        out.append((step, fmean(values), min(values), max(values)))
    return out


def first_step_reaching(curve: list[tuple[int, float, float, float]], target: float) -> int | None:
    """The first step whose mean is >= target (None if the curve never gets there)."""
    return next((step for step, mean, _, _ in curve if mean >= target), None)


def aggregate(results: list[dict[str, Any]], presets: list[str]) -> dict[str, Any]:
    """`table.json`: per preset, the final held-out accuracy over seeds and the curve summaries.

    `steps_to_outcome_final` is the first step at which the preset's mean held-out curve reaches
    outcome-only's final mean (null when outcome-only is not in the ablation or never reached).
    """
    by_preset = {p: sorted((r for r in results if r["preset"] == p), key=lambda r: r["seed"]) for p in presets}
    table: dict[str, Any] = {"presets": {}}
    outcome_final = None
    if by_preset.get("outcome_only"):
        outcome_final = fmean(r["final"]["accuracy"] for r in by_preset["outcome_only"])
    for preset, runs in by_preset.items():
        if not runs:
            continue
        acc = [r["final"]["accuracy"] for r in runs]
        curve = mean_curve([r["curve"] for r in runs], "accuracy")
        table["presets"][preset] = {
            "label": LABELS.get(preset, preset),
            "seeds": [r["seed"] for r in runs],
            "accuracy_mean": fmean(acc),
            "accuracy_std": pstdev(acc) if len(acc) > 1 else 0.0,
            "accuracy_per_seed": acc,
            "accuracy_before_mean": fmean(r["curve"][0]["accuracy"] for r in runs),
            "memory_tokens_mean": fmean(r["final"]["memory_tokens"] for r in runs),
            "valid_call_rate_mean": fmean(r["final"]["valid_call_rate"] for r in runs),
            "steps_to_outcome_final": (first_step_reaching(curve, outcome_final)
                                       if outcome_final is not None else None),
            "curve_accuracy": [[s, m] for s, m, _, _ in curve],
            "curve_memory_tokens": [[s, m] for s, m, _, _ in mean_curve([r["curve"] for r in runs],
                                                                           "memory_tokens")],
            "wall_s": sum(r["wall_s"] for r in runs),
        }
    # Paired by seed: the same warm start, data order and held-out sampling seed under every preset,
    # so the per-seed difference to outcome-only is the comparison's own measure (its sign per seed
    # says more than two means with their spreads).
    if by_preset.get("outcome_only"):
        base = {r["seed"]: r["final"]["accuracy"] for r in by_preset["outcome_only"]}
        for preset, entry in table["presets"].items():
            gains = [r["final"]["accuracy"] - base[r["seed"]] for r in by_preset[preset] if r["seed"] in base]
            entry["gain_vs_outcome_per_seed"] = gains
            entry["gain_vs_outcome_mean"] = fmean(gains) if gains else None
    orders: dict[int, set[str]] = {}
    for r in results:
        orders.setdefault(r["seed"], set()).add(r["data_order_sha256"])
    table["paired"] = all(len(shas) == 1 for shas in orders.values())
    table["verdict"] = verdict(table["presets"])
    return table


def verdict(presets: dict[str, Any]) -> list[str]:
    """The paper's two claims, checked on the measured means: Fine-Mem >= +CSR >= outcome-only in
    accuracy, and the EARA presets (+EARA, Fine-Mem) lower in memory than the others. Each line
    also says whether the gap exceeds the spread over seeds (a gap inside it is not a finding)."""
    lines = []
    acc = {p: presets[p]["accuracy_mean"] for p in presets}
    std = {p: presets[p]["accuracy_std"] for p in presets}
    order = [p for p in ("finemem", "csr_only", "outcome_only") if p in acc]
    if len(order) >= 2:
        pairs = list(itertools.pairwise(order))
        holds = all(acc[a] >= acc[b] for a, b in pairs)
        gaps = ", ".join(f"{LABELS[a]} - {LABELS[b]} = {acc[a] - acc[b]:+.3f} (seed std {max(std[a], std[b]):.3f})"
                         for a, b in pairs)
        lines.append(f"accuracy order {' >= '.join(LABELS[p] for p in order)}: "
                     f"{'holds' if holds else 'does not hold'} ({gaps})")
    eara = [p for p in ("eara_only", "finemem") if p in presets]
    other = [p for p in ("outcome_only", "csr_only") if p in presets]
    if eara and other:
        mem = {p: presets[p]["memory_tokens_mean"] for p in presets}
        holds = max(mem[p] for p in eara) < min(mem[p] for p in other)
        lines.append("EARA presets lower in memory: " + ("holds" if holds else "does not hold") + " ("
                     + ", ".join(f"{LABELS[p]} {mem[p]:.1f}" for p in (*eara, *other)) + " tokens)")
    return lines


def render_markdown(table: dict[str, Any], command: str) -> str:
    rows = [("| preset | held-out accuracy (mean ± std over seeds) | per seed | paired gain over outcome-only "
             "(per seed) | before RL | memory tokens | valid-call rate | steps to outcome-only's final | wall "
             "| paper score | paper memory |"),
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset, e in table["presets"].items():
        paper = PAPER.get(preset, ("-", "-"))
        steps = "-" if e["steps_to_outcome_final"] is None else str(e["steps_to_outcome_final"])
        gains = e.get("gain_vs_outcome_per_seed")
        gain = "-" if not gains else (f"{e['gain_vs_outcome_mean']:+.3f} ("
                                      + ", ".join(f"{g:+.3f}" for g in gains) + ")")
        rows.append(f"| {e['label']} | {e['accuracy_mean']:.3f} ± {e['accuracy_std']:.3f} | "
                    f"{', '.join(f'{a:.3f}' for a in e['accuracy_per_seed'])} | {gain} | "
                    f"{e['accuracy_before_mean']:.3f} | "
                    f"{e['memory_tokens_mean']:.1f} | {e['valid_call_rate_mean']:.3f} | {steps} | "
                    f"{e['wall_s'] / 60:.1f} min | {paper[0]} | {paper[1]} |")
    lines = [f"Command: `{command}`", "", *rows, "",
             f"Data order identical across presets for every seed (paired): {table['paired']}", ""]
    lines += [f"- {line}" for line in table["verdict"]]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], results: list[dict[str, Any]], out_png: Path) -> Path:
    """Held-out accuracy and memory tokens against step: per preset the mean over seeds, with the
    min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for preset in table["presets"]:
        curves = [r["curve"] for r in results if r["preset"] == preset]
        for ax, key in zip(axes, ("accuracy", "memory_tokens")):
            pts = mean_curve(curves, key)
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", markersize=3, label=LABELS.get(preset, preset))
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
    axes[0].set_ylabel("held-out accuracy")
    axes[1].set_ylabel("memory tokens (final memory)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("reward ablation: mean over seeds, band = min-max")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------------- the runs
def run_name(preset: str, seed: int) -> str:
    return f"{preset}-seed{seed}"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_one(config_args: list[str], preset: str, seed: int, out: Path, sft_model: Path, group: str,
            shared_before: dict[str, Any] | None) -> dict[str, Any]:
    """One (preset, seed) RL run from the warm start, in `out/runs/<preset>-seed<seed>`; its result
    (curve, final evaluation, wall time, data-order hash) is written to RESULT.json last, so a
    RESULT.json means the run finished. A half-finished run directory is started over."""
    import ray

    from finemem.config import load_config, save_config
    from finemem.tracking import RunDir
    from learner.trainer import run_training

    path = out / "runs" / run_name(preset, seed)
    if path.exists():
        print(f"finemem ablation: {path} did not finish; starting it over", flush=True)
        shutil.rmtree(path)
    cfg = load_config([*config_args, f"reward.preset={preset}", f"run.seed={seed}", f"model.path={sft_model}",
                       f"run.out_dir={out / 'runs'}", f"run.name={run_name(preset, seed)}", f"wandb.group={group}",
                       f"wandb.tags=[{preset},seed{seed}]",
                       f"eval.before_training={'false' if shared_before else 'true'}"])
    run = RunDir(path)
    save_config(cfg, run.config_path)
    t0 = time.perf_counter()
    try:
        result = run_training(cfg, run, resume=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()  # each run starts its own services on a clean local Ray
    wall = time.perf_counter() - t0
    curve = _read_jsonl(path / "eval_curve.jsonl")
    if shared_before is not None:
        curve = [{**shared_before, "label": "before (shared)"}, *curve]
    order = (path / "data_order.jsonl").read_bytes()
    record = {"preset": preset, "seed": seed, "run_dir": str(path), "curve": curve,
              "final": {k: result["eval_after"][k] for k in ("accuracy", "memory_tokens", "memory_items",
                                                             "valid_call_rate")},
              "final_step": result["final_step"], "wall_s": wall,
              "data_order_sha256": hashlib.sha256(order).hexdigest()}
    (path / RESULT_FILE).write_text(json.dumps(record, indent=2))
    return record


def cli(argv: list[str]) -> int:
    """`finemem ablation [--presets a,b,...] [--seeds N] [--out DIR] [key=value ...]`."""
    from finemem.cli import parse_command
    from finemem.config import ConfigError, load_config
    from finemem.model_init import model_folder_problem
    from learner.prepare import prepare_data, prepare_warm_start, stage

    parser = argparse.ArgumentParser(prog="finemem ablation", description=cli.__doc__)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated reward presets")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per preset (run.seed = first_seed + i)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--out", default="runs/ablation", help="where runs, table and plot go")
    parser.add_argument("--warm-start", default=None,
                        help="an existing warm-start model folder to start from (default: build one in OUT/warm_start)")
    args, overrides = parse_command(parser, argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    from finemem.rewards import PRESETS as KNOWN

    unknown = [p for p in presets if p not in KNOWN]
    if unknown or not presets:
        raise ConfigError(f"--presets {args.presets!r}: unknown {unknown} (choose from {', '.join(KNOWN)})")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: must be >= 1")
    out = Path(args.out)
    art = out / "warm_start"
    # Everything the ablation writes stays in OUT (the warm start's own run directory included; each RL
    # run sets its own run.out_dir).
    config_args = ["experiment=ablation", f"data.train_path={art / 'data' / 'train.jsonl'}",
                   f"data.eval_path={art / 'data' / 'eval.jsonl'}", f"run.out_dir={art / 'runs'}", *overrides]
    cfg = load_config(config_args)  # a bad override fails here, before anything is built
    if not cfg.eval.after_training:
        raise ConfigError("eval.after_training=false: the ablation's table is the held-out accuracy after training")
    seeds = [args.first_seed + i for i in range(args.seeds)]
    total = len(presets) * len(seeds)
    print(f"finemem ablation: {len(presets)} presets x {len(seeds)} seeds = {total} runs -> {out}", flush=True)
    t_all = time.perf_counter()
    if args.warm_start:
        sft_model = Path(args.warm_start)
        problem = model_folder_problem(sft_model)
        if problem:
            raise ConfigError(f"finemem ablation --warm-start: {problem}")
        prepare_data(cfg, "1/4 synthetic data (models: --warm-start)")
    else:
        sft_model = prepare_warm_start(cfg, art, config_args, numbered=(1, 4)).sft_model
    print(f"finemem ablation: warm start {sft_model} (every run starts from it)", flush=True)

    group = f"ablation-{out.resolve().name}"
    results: list[dict[str, Any]] = []
    stage(f"4/4 RL runs ({total})")
    for i, seed in enumerate(seeds):
        shared_before = None
        for j, preset in enumerate(presets):
            n = i * len(presets) + j + 1
            done = out / "runs" / run_name(preset, seed) / RESULT_FILE
            if done.is_file():
                record = json.loads(done.read_text())
                print(f"[{n}/{total}] {preset} seed {seed}: finished earlier, skipped "
                      f"(held-out {record['final']['accuracy']:.3f})", flush=True)
            else:
                print(f"[{n}/{total}] {preset} seed {seed}: running", flush=True)
                record = run_one(config_args, preset, seed, out, sft_model, group, shared_before)
                print(f"[{n}/{total}] {preset} seed {seed}: held-out {record['curve'][0]['accuracy']:.3f} -> "
                      f"{record['final']['accuracy']:.3f} in {record['wall_s'] / 60:.1f} min", flush=True)
            results.append(record)
            if shared_before is None:
                shared_before = {k: v for k, v in record["curve"][0].items() if k != "label"}
    table = aggregate(results, presets)
    table["command"] = "finemem ablation " + " ".join(argv)
    table["warm_start"] = str(sft_model)
    table["wall_s_total"] = time.perf_counter() - t_all
    (out / "table.json").write_text(json.dumps(table, indent=2))
    (out / "table.md").write_text(render_markdown(table, table["command"]))
    plot(table, results, out / "curves.png")
    print("\n" + (out / "table.md").read_text())
    print(f"finemem ablation: {out / 'table.md'}, {out / 'table.json'}, {out / 'curves.png'} "
          f"({table['wall_s_total'] / 60:.1f} min this invocation)")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
