"""Benchmark: episodes scored per second by the reward pool with 1 and with 2 actors.

Episodes are noisy scripted-teacher rollouts of synthetic instances (8 chunks, 3 facts and 3
distractors per chunk, 5 chunk QA per chunk, 20 questions of which 20% are asked), carrying
step payloads of realistic size (prompt/response token ids and logprobs), scored with the CPU
evidence reader under the full Fine-Mem preset. Both pools (1 and 2 actors) live on one fresh
local Ray (`ray.init(num_cpus=2)`), are warmed up, then timed alternately on the same episodes
(median of `--rounds` passes each; the machine is shared, so alternating keeps background load
from favouring one size). The last line printed is `ratio: <2-actor rate / 1-actor rate>`.

    flock /tmp/finemem-heavy.lock .venv/bin/python bench/reward_pool.py [--episodes 96]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from finemem.config import DataConfig, load_config
from finemem.data.synth import generate_instances
from finemem.records import Episode, StepSample
from finemem.teacher import TeacherNoise, run_teacher_episode

PROMPT_TOKENS = 600
RESPONSE_TOKENS = 80


def bench_episodes(n: int, seed: int = 0, group_size: int = 4) -> list[Episode]:
    """`n` teacher episodes, `group_size` rollouts per instance, with token payloads per step."""
    data = DataConfig(
        synth_min_chunks=8,
        synth_max_chunks=8,
        synth_facts_per_chunk=3,
        synth_distractors_per_chunk=3,
        synth_questions_per_instance=20,
    )
    noise = TeacherNoise(miss_fact=0.3, store_distractor=0.3, miss_update=0.5, verbose=0.2)
    rng = random.Random(seed)
    episodes: list[Episode] = []
    for i, inst in enumerate(generate_instances((n + group_size - 1) // group_size, seed, data)):
        for g in range(group_size):
            steps = run_teacher_episode(inst, noise, random.Random(1000 * i + g))
            samples = [
                StepSample(
                    step=s.step,
                    prompt_ids=[rng.randrange(8192) for _ in range(PROMPT_TOKENS)],
                    response_ids=[rng.randrange(8192) for _ in range(RESPONSE_TOKENS)],
                    logprobs=[-rng.random() for _ in range(RESPONSE_TOKENS)],
                    response_text="",
                    ops=s.results,
                    memory=s.memory_after,
                )
                for s in steps
            ]
            episodes.append(Episode(f"{inst.instance_id}/{g}", inst, g, samples))
    return episodes[:n]


def local_ms_per_episode(episodes: list[Episode], cfg) -> float:
    """In-process scoring time (no Ray), for reference."""
    import asyncio

    from reward.answerers import EvidenceReader
    from reward.scorer import score_episode_async

    async def run() -> float:
        reader = EvidenceReader()
        start = time.perf_counter()
        for e in episodes:
            await score_episode_async(e, cfg, reader)
        return (time.perf_counter() - start) / len(episodes) * 1e3

    return asyncio.run(run())


def timed_rate(pool, episodes: list[Episode]) -> float:
    """Episodes per second through a warm pool."""
    start = time.perf_counter()
    done = sum(1 for _ in pool.score_many(episodes))
    elapsed = time.perf_counter() - start
    assert done == len(episodes)
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per pool size (median reported)")
    args = parser.parse_args(argv)

    import ray

    cfg = load_config([])
    episodes = bench_episodes(args.episodes, seed=0)
    warmup = bench_episodes(8, seed=1)
    steps = sum(len(e.steps) for e in episodes)
    answers = sum(len(qs) for e in episodes for qs in e.instance.chunk_qa)
    print(f"episodes: {len(episodes)} ({steps} steps, {answers} chunk questions), preset {cfg.reward.preset}")
    print(f"local scoring (no Ray): {local_ms_per_episode(episodes[:32], cfg):.1f} ms/episode")

    from reward.pool import RewardPool

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pools = {n: RewardPool(cfg, num_actors=n) for n in (1, 2)}
        rates: dict[int, list[float]] = {1: [], 2: []}
        for pool in pools.values():
            pool.wait_ready()
            for _ in pool.score_many(warmup):
                pass
        for _ in range(args.rounds):  # alternate, so background load hits both sizes alike
            for n, pool in pools.items():
                rates[n].append(timed_rate(pool, episodes))
        for pool in pools.values():
            pool.shutdown()
    finally:
        ray.shutdown()
    rate1, rate2 = statistics.median(rates[1]), statistics.median(rates[2])
    for n, rate in ((1, rate1), (2, rate2)):
        runs = ", ".join(f"{r:.1f}" for r in rates[n])
        print(f"{n} actor{'s' if n > 1 else ''}: {rate:.1f} episodes/s (median of {args.rounds}: {runs})")
    print(f"ratio: {rate2 / rate1:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
