"""Learner: lr schedule and checkpoint layout (pure), then real DeepSpeed learner actors on local Ray.

The heavy tests share one Ray and one tiny random Qwen3 (with a real local tokenizer). They check:
training moves the weights with finite losses; weights reach an engine through the object store;
save -> fresh actor -> load resumes bit-identically; 2 gloo ranks give the 1-rank gradient.
"""

import json
import math
import random
from pathlib import Path

import pytest

from learner.actor import lr_factor
from learner.checkpoint import (
    begin_checkpoint,
    capture_rng_state,
    finish_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    partial_dir,
    read_state,
    restore_rng_state,
    write_state,
)


# ---- pure -------------------------------------------------------------------------------------
def test_lr_factor_warmup_then_constant_or_cosine():
    assert [lr_factor(s, 10, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 10, 0) == 1.0
    cos = [lr_factor(s, 6, 2, "cosine") for s in range(7)]
    assert cos[:3] == [0.5, 1.0, 1.0]
    assert cos[4] == pytest.approx(0.5) and cos[6] == pytest.approx(0.0)
    assert lr_factor(50, 6, 2, "cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, 10, 1, "linear")


def _save(run, step, keep=None):
    path = begin_checkpoint(run, step)
    write_state(path, {"step": step})
    return finish_checkpoint(run, step, keep=keep)


def test_checkpoint_layout_completion_and_retention(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    first = _save(tmp_path, 1)
    assert first == tmp_path / "ckpt" / "step_000001" and (first / "COMPLETE").is_file()
    assert read_state(first) == {"step": 1}
    # a half-written checkpoint (no COMPLETE, still .partial) is never resumed from
    half = begin_checkpoint(tmp_path, 2)
    write_state(half, {"step": 2})
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        read_state(half)
    # a folder renamed by hand but without the marker is ignored too
    (tmp_path / "ckpt" / "step_000009").mkdir()
    assert latest_checkpoint(tmp_path) == first
    for step in (3, 4, 5):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not partial_dir(tmp_path, 2).exists()  # the abandoned write was cleaned up
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt" / "step_000005"
    with pytest.raises(FileNotFoundError, match="state.json"):
        begin_checkpoint(tmp_path, 6)
        finish_checkpoint(tmp_path, 6)


def test_rng_state_round_trips_through_json():
    import numpy as np
    import torch

    state = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ---- heavy: real Ray + DeepSpeed (gloo) -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from helpers_tokenizer import build_test_tokenizer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen3")
    tok = build_test_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out, len(tok)


def _cfg(model_dir, **learner):
    from omegaconf import OmegaConf

    from finemem.config import FineMemConfig

    cfg = OmegaConf.structured(FineMemConfig)
    cfg.model.path = str(model_dir)
    cfg.learner.lr = 1e-3
    cfg.learner.total_steps = 4
    cfg.learner.warmup_ratio = 0.5  # lr factors 0.5, 1, 1, 0.5: resuming without the schedule would show
    cfg.learner.lr_schedule = "cosine"
    cfg.learner.micro_batch_tokens = 40
    cfg.learner.keep_checkpoints = 2
    for k, v in learner.items():
        setattr(cfg.learner, k, v)
    return cfg


def _batch(seed, vocab):
    """Synthetic step batch: 3 rollouts x 3 steps, old logprobs near the random model's (~ -log V)."""
    from learner.batching import TrainSample, assign_loss_weights

    rng = random.Random(seed)
    samples = []
    for r in range(3):
        for t in range(3):
            n = rng.randint(1, 6)
            samples.append(
                TrainSample(
                    prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(2, 9))],
                    response_ids=[rng.randrange(vocab) for _ in range(n)],
                    old_logprobs=[-math.log(vocab) + rng.uniform(-0.3, 0.3) for _ in range(n)],
                    advantage=rng.uniform(-1.5, 1.5),
                    rollout_key=f"s{seed}-r{r}",
                    policy_version=0,
                    step=t + 1,
                )
            )
    assign_loss_weights(samples)
    return samples


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def one_rank_run(ray_local, tiny_model, tmp_path_factory):
    """One rank: initial export, two steps, checkpoint, a third step; and a fresh actor resuming."""
    import time

    from learner.actor import LearnerGroup

    model_dir, vocab = tiny_model
    run_dir = tmp_path_factory.mktemp("run")
    ray = ray_local
    t0 = time.perf_counter()
    group = LearnerGroup(_cfg(model_dir, cpu_threads=2))  # Ray alone would give the rank 1 thread
    start_s = time.perf_counter() - t0
    setup_info = group.setup_info
    initial = ray.get(group.export_weights())
    steps = [group.train_step(_batch(1, vocab))]
    after_one = ray.get(group.export_weights())
    steps.append(group.train_step(_batch(2, vocab)))
    after_two = ray.get(group.export_weights())
    t1 = time.perf_counter()
    ckpt = group.save_checkpoint(str(run_dir), {"data_cursor": 17, "epoch": 0})
    save_s = time.perf_counter() - t1
    third = group.train_step(_batch(3, vocab))
    after_three = ray.get(group.export_weights())

    @ray.remote(num_cpus=0)
    class RecordingEngine:  # the edge of the test: records what an engine actor would receive
        def update_weights(self, payload, version):
            self.got = (version, ray.get(payload[0]))
            return {}

        def received(self):
            return self.got

    engine = RecordingEngine.remote()
    published = group.publish_weights([engine])
    received = ray.get(engine.received.remote())
    group.shutdown()

    t2 = time.perf_counter()
    fresh = LearnerGroup(_cfg(model_dir))
    client_state = fresh.load_checkpoint(str(run_dir))
    load_s = time.perf_counter() - t2
    resumed_version = fresh.policy_version()
    resumed_third = fresh.train_step(_batch(3, vocab))
    resumed_after_three = ray.get(fresh.export_weights())
    fresh.shutdown()
    print(f"\nlearner timings: group start {start_s:.1f}s, steps {[round(s['step_time_s'], 3) for s in steps]}s, "
          f"save {save_s:.2f}s, fresh start+load {load_s:.1f}s")
    return {
        "initial": initial, "steps": steps, "after_one": after_one, "after_two": after_two, "ckpt": Path(ckpt),
        "third": third, "after_three": after_three, "published": published, "received": received,
        "client_state": client_state, "resumed_version": resumed_version, "resumed_third": resumed_third,
        "resumed_after_three": resumed_after_three, "run_dir": run_dir, "vocab": vocab, "setup_info": setup_info,
    }


@pytest.mark.heavy
def test_two_train_steps_give_finite_losses_and_move_the_weights(one_rank_run):
    r = one_rank_run
    for m in r["steps"]:
        assert all(math.isfinite(m[k]) for k in ("loss", "pg_loss", "kl", "grad_norm", "entropy"))
        assert m["micro_batches"] >= 2 and m["response_tokens"] > 0
    assert [m["policy_version"] for m in r["steps"]] == [1.0, 2.0]
    assert [m["lr"] for m in r["steps"]] == pytest.approx([5e-4, 1e-3])  # warm-up
    assert r["steps"][0]["kl"] == pytest.approx(0.0, abs=1e-9)  # policy == reference before any update
    assert r["steps"][1]["kl"] > 0
    assert _max_diff(r["initial"], r["after_two"]) > 1e-4
    assert "lm_head.weight" not in r["initial"]  # tied: the engine loads the embedding
    assert [info["torch_threads"] for info in r["setup_info"]] == [2]  # learner.cpu_threads


@pytest.mark.heavy
def test_weights_are_published_through_the_object_store(one_rank_run):
    import torch

    r = one_rank_run
    version, state = r["received"]
    assert version == r["published"] == 3
    assert all(torch.equal(state[k], r["after_three"][k]) for k in r["after_three"])


@pytest.mark.heavy
def test_checkpoint_holds_deepspeed_state_hf_folder_and_state_json(one_rank_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = one_rank_run
    ckpt = r["ckpt"]
    assert ckpt == r["run_dir"] / "ckpt" / "step_000002" and (ckpt / "COMPLETE").is_file()
    state = read_state(ckpt)
    assert state["step"] == 2 and state["policy_version"] == 2 and state["world_size"] == 1
    assert state["client_state"] == {"data_cursor": 17, "epoch": 0}
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    model = AutoModelForCausalLM.from_pretrained(ckpt / "hf", dtype=torch.float32)
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in r["after_two"].items())
    assert len(AutoTokenizer.from_pretrained(ckpt / "hf")) == r["vocab"]
    assert any((ckpt / "deepspeed").rglob("*optim_states.pt"))


@pytest.mark.heavy
def test_resume_is_bit_identical(one_rank_run):
    import torch

    r = one_rank_run
    assert r["client_state"] == {"data_cursor": 17, "epoch": 0}
    assert r["resumed_version"] == 2
    for key in ("loss", "pg_loss", "kl", "grad_norm", "lr", "clip_frac", "ratio_mean"):
        assert r["resumed_third"][key] == r["third"][key], key
    assert r["resumed_third"]["policy_version"] == 3
    assert all(torch.equal(r["resumed_after_three"][k], r["after_three"][k]) for k in r["after_three"])


@pytest.mark.heavy
def test_two_gloo_ranks_match_one_rank(one_rank_run, tiny_model):
    """Same batch on 2 ranks (3 micro-batches: one rank runs a padding pass) vs on 1 rank."""
    import ray

    from learner.actor import LearnerGroup

    model_dir, vocab = tiny_model
    r = one_rank_run
    group = LearnerGroup(_cfg(model_dir, num_ranks=2))
    try:
        first = group.train_step(_batch(1, vocab))
        weights = ray.get(group.export_weights())
    finally:
        group.shutdown()
    single = r["steps"][0]
    assert first["micro_batches"] == single["micro_batches"] == 3
    for key in ("loss", "pg_loss", "grad_norm", "response_tokens", "clip_frac", "ratio_mean", "entropy"):
        assert first[key] == pytest.approx(single[key], rel=1e-5, abs=1e-8), key
    assert _max_diff(weights, r["initial"]) > 1e-4
    print(f"\n2 ranks vs 1 rank: max |weight diff| after one step {_max_diff(weights, r['after_one']):.3g}")
    assert _max_diff(weights, r["after_one"]) < 1e-5  # (Adam hides the gradient scale; grad_norm checks it)


@pytest.mark.heavy
def test_mini_batches_equal_one_training_step_per_rollout_group(ray_local, tiny_model):
    """algo.mini_batches=3 over 3 rollouts == three training steps of one rollout each (same lr schedule)."""
    import ray

    from learner.actor import LearnerGroup
    from learner.batching import assign_loss_weights

    model_dir, vocab = tiny_model
    batch = _batch(1, vocab)
    cfg = _cfg(model_dir)
    cfg.algo.mini_batches = 3
    group = LearnerGroup(cfg)
    try:
        m = group.train_step(batch)
        split = ray.get(group.export_weights())
    finally:
        group.shutdown()
    assert m["optimizer_steps"] == 3 and m["policy_version"] == 1.0
    assert m["lr"] == pytest.approx(1e-3 * 3 / 6)  # 4 steps x 3 optimizer steps, warm-up over 6 of them

    one_by_one = LearnerGroup(_cfg(model_dir, total_steps=12))
    try:
        for key in dict.fromkeys(s.rollout_key for s in batch):
            part = [s for s in _batch(1, vocab) if s.rollout_key == key]
            assign_loss_weights(part)
            one_by_one.train_step(part)
        sequential = ray.get(one_by_one.export_weights())
    finally:
        one_by_one.shutdown()
    assert _max_diff(split, sequential) < 1e-6


@pytest.mark.heavy
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_shared_prefix_forward_trains_the_same_weights_under_deepspeed(ray_local, tiny_model, zero_stage):
    """Two DeepSpeed steps on prompts that share a system prompt: learner.share_prefix on == off.

    ZeRO-3 gathers parameters in hooks around every module call: the prefix pass and the second
    pass are two forwards before one backward."""
    import ray

    from learner.actor import LearnerGroup
    from learner.batching import assign_loss_weights

    model_dir, vocab = tiny_model

    def prefixed(seed):
        batch = _batch(seed, vocab)
        system = [random.Random(99).randrange(vocab) for _ in range(12)]
        for s in batch:
            s.prompt_ids = system + s.prompt_ids
        assign_loss_weights(batch)
        return batch

    results = {}
    for share in (True, False):
        group = LearnerGroup(_cfg(model_dir, share_prefix=share, micro_batch_tokens=80, zero_stage=zero_stage))
        try:
            metrics = [group.train_step(prefixed(seed)) for seed in (1, 2)]
            results[share] = (metrics, ray.get(group.export_weights()))
        finally:
            group.shutdown()
    (shared_m, shared_w), (full_m, full_w) = results[True], results[False]
    assert shared_m[0]["micro_batches"] >= 2  # several micro-batches, each sharing the 12-token prefix
    for a, b in zip(shared_m, full_m):
        for key in ("loss", "pg_loss", "kl", "grad_norm", "entropy", "ratio_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert _max_diff(shared_w, full_w) < 1e-5
