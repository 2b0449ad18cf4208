"""Held-out evaluation: run the policy on unseen instances, answer EVERY question from the final
memory, and report accuracy, memory size and the valid-call rate.

Used by the trainer (before, during and after RL, on the same engines) and `finemem ablation`; the
benchmark harness `finemem eval` (learner.harness) runs its policy episodes through `run_on_engines`.
Accuracy is the mean over episodes of the fraction of questions answered correctly (the dataset
metric of each source); with several samples per instance the policy's sampling noise averages out.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from finemem.records import Episode, Instance, episode_ids


def eval_reward_config(cfg):
    """The scoring config for evaluation: all questions, no chunk QA needed, same answerer."""
    from omegaconf import OmegaConf

    ev = copy.deepcopy(cfg)
    OmegaConf.set_readonly(ev, False)
    ev.reward.global_question_fraction = 1.0
    ev.reward.preset = "outcome_only" if cfg.reward.preset != "memalpha" else "memalpha"
    return ev


def summarize_eval(scored: Sequence, wall_s: float) -> dict[str, Any]:
    from finemem.scoring import summarize_scores
    from finemem.train_metrics import invalid_reasons, op_mix

    episodes = [s.episode for s in scored]
    per_item = [{"data_source": s.episode.instance.data_source, "competency": s.episode.instance.competency,
                 "score": s.global_score} for s in scored]
    by = summarize_scores(per_item)
    mix = op_mix(episodes)
    return {
        "episodes": len(scored),
        "accuracy": fmean(s.global_score for s in scored) if scored else 0.0,
        "memory_tokens": fmean(ep.steps[-1].memory_tokens for ep in episodes if ep.steps) if episodes else 0.0,
        "memory_items": fmean(len(ep.steps[-1].memory) for ep in episodes if ep.steps) if episodes else 0.0,
        "valid_call_rate": mix["ops/valid_call_rate"],
        "op_mix": {k.split("/", 1)[1]: v for k, v in mix.items() if k != "ops/valid_call_rate"},
        "invalid_reasons": invalid_reasons(episodes),
        "per_source": by.get("per_source", {}),
        "per_competency": by.get("per_competency", {}),
        "wall_s": wall_s,
    }


def score_all(episodes: Sequence[Episode], cfg, count_tokens=None) -> list:
    """Score episodes in-process with every question (concurrently within one event loop)."""
    from reward.answerers import make_answerer
    from reward.scorer import score_episode_async

    ev = eval_reward_config(cfg)

    async def run():
        answerer = make_answerer(ev.reward.answerer)
        try:
            return await asyncio.gather(*[score_episode_async(ep, ev, answerer, count_tokens) for ep in episodes])
        finally:
            await answerer.close()

    return asyncio.run(run())


def run_on_engines(engines: list, instances: Sequence[Instance], samples: int, sampling: dict,
                   label: str = "") -> list[Episode]:
    """`samples` episodes per instance on the rollout actors (round robin), in instance order."""
    import ray

    refs = []
    for i, inst in enumerate(instances):
        ids = episode_ids(f"eval-{label}-{i}", samples)
        refs.append(engines[i % len(engines)].run_group.remote(inst, samples, ids, sampling))
    return [ep for group in ray.get(refs) for ep in group]


def evaluate_on_engines(engines: list, instances: Sequence[Instance], cfg, count_tokens, sampling: dict,
                        label: str = "") -> dict[str, Any]:
    """Run `eval.samples_per_instance` episodes per instance on the rollout actors, then score."""
    import time

    t0 = time.perf_counter()
    episodes = run_on_engines(engines, instances, max(1, cfg.eval.samples_per_instance), sampling, label)
    scored = score_all(episodes, cfg, count_tokens)
    result = summarize_eval(scored, time.perf_counter() - t0)
    result["label"] = label
    result["temperature"] = sampling.get("temperature")
    return result


def format_before_after(before: dict | None, after: dict | None) -> str:
    """The short table `make demo` prints, ending with the `held-out accuracy: a -> b` line."""
    rows = [("accuracy", "accuracy", "{:.3f}"), ("memory tokens", "memory_tokens", "{:.1f}"),
            ("memory items", "memory_items", "{:.1f}"), ("valid-call rate", "valid_call_rate", "{:.3f}")]
    lines = [f"{'held-out':<18}{'before RL':>12}{'after RL':>12}"]
    for name, key, fmt in rows:
        b = fmt.format(before[key]) if before else "-"
        a = fmt.format(after[key]) if after else "-"
        lines.append(f"{name:<18}{b:>12}{a:>12}")
    if before and after:
        lines.append(f"held-out accuracy: {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    return "\n".join(lines)
