"""`finemem rollout`: run memory-agent episodes with vLLM engine actors on Ray and write them to jsonl.

    finemem rollout --model DIR --data PATH --episodes N --out FILE.jsonl [--group-size G] [key=value ...]

N episodes are run as ceil(N / G) groups of G episodes over consecutive instances of the data file
(cycling when there are fewer instances than groups; the last group may be smaller). Groups are
spread round-robin over `rollout.num_engines` RolloutActors. The output has one `Episode.to_dict()`
per line, in group order; the summary (valid-call rate, ops per step, memory tokens, generated
tokens per second over the rollout wall time, engine start excluded) is printed and written next to
it as `<FILE>.summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def plan_groups(num_instances: int, episodes: int, group_size: int) -> list[tuple[int, int]]:
    """(instance index, group size) for each group: N episodes in groups of G, cycling instances."""
    if num_instances < 1:
        raise ValueError("no instances to roll out")
    if episodes < 1 or group_size < 1:
        raise ValueError(f"--episodes and --group-size must be >= 1 (got {episodes}, {group_size})")
    groups = math.ceil(episodes / group_size)
    sizes = [group_size] * (groups - 1) + [episodes - group_size * (groups - 1)]
    return [(g % num_instances, sizes[g]) for g in range(groups)]


def roll_out(
    actors: list,
    instances: list,
    plan: list[tuple[int, int]],
    progress: bool = True,
    sampling: dict | None = None,
) -> tuple[list, float]:
    """Run the planned groups on the actors (round-robin); returns (episodes in group order, wall seconds).

    Episode ids are `<instance_id>/g<group>/<member>`.
    """
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    refs = []
    for g, (i, size) in enumerate(plan):
        inst = instances[i]
        ids = [f"{inst.instance_id}/g{g}/{k}" for k in range(size)]
        refs.append(actors[g % len(actors)].run_group.remote(inst.to_dict(), size, ids, sampling))
    index = {ref: g for g, ref in enumerate(refs)}
    results: dict[int, list] = {}
    pending = list(refs)
    with tqdm(total=sum(size for _, size in plan), desc="rollout", unit="ep", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                bar.update(len(results[index[ref]]))
    wall = time.perf_counter() - t0
    return [ep for g in range(len(plan)) for ep in results[g]], wall


def cli(argv: list[str]) -> int:
    """`finemem rollout --model DIR --data PATH --episodes N --out FILE.jsonl`: run and write episodes."""
    from finemem.cli import parse_command
    from finemem.config import load_config
    from finemem.model_init import model_folder_problem

    parser = argparse.ArgumentParser(prog="finemem rollout", description=cli.__doc__)
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: model.path)")
    parser.add_argument(
        "--data", default=None, help="instances: jsonl / Memalpha or MAB parquet (default: data.eval_path)"
    )
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes N")
    parser.add_argument("--out", required=True, help="output jsonl, one episode per line")
    parser.add_argument(
        "--group-size", type=int, default=1, help="episodes per instance run together (default 1)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parse_command(parser, argv)
    cfg = load_config(overrides)
    model = Path(args.model or cfg.model.path)
    problem = model_folder_problem(model)
    if problem:
        print(f"finemem rollout --model: {problem}")
        return 2
    data = Path(args.data or cfg.data.eval_path)

    from finemem.data.readers import load_instances

    fmt = "auto" if args.data else cfg.data.format  # an explicit file is read by its extension
    instances = load_instances(
        data, fmt, cfg.data.chunk_tokens, cfg.data.skip_bad_rows, max_instances=cfg.data.max_instances
    )
    plan = plan_groups(len(instances), args.episodes, args.group_size)

    import ray

    from rollout.actor import create_rollout_actor
    from rollout.summary import format_summary, summarize_episodes

    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address)
    else:
        ray.init(num_cpus=cfg.cluster.num_cpus or 2, include_dashboard=False, log_to_driver=False)
    actors = []
    try:
        t0 = time.perf_counter()
        actors = [
            create_rollout_actor(cfg, str(model), num_cpus=1) for _ in range(int(cfg.rollout.num_engines))
        ]
        ray.get([a.start.remote() for a in actors])
        start_s = time.perf_counter() - t0
        print(
            f"rollout: {len(actors)} engine(s) started in {start_s:.1f}s; {args.episodes} episodes in "
            f"{len(plan)} group(s) over {len(instances)} instance(s) from {data}"
        )

        episodes, wall = roll_out(actors, instances, plan, progress=not args.no_progress)
    finally:
        for a in actors:
            try:
                ray.get(a.shutdown.remote())
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                print(f"rollout: engine shutdown failed: {e!r}")
        ray.shutdown()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for ep in episodes:
            f.write(json.dumps(ep.to_dict(), ensure_ascii=False) + "\n")
    summary = summarize_episodes(episodes, wall)
    summary["engine_start_s"] = start_s
    Path(str(out) + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {len(episodes)} episodes to {out}")
    return 0
