"""Pure aggregation of what one training step logs (reward components, per-step-index reward and
advantage, QA accuracy, memory size, operation mix). Kept apart from the trainer so it is tested
without Ray and the metric names stay stable for W&B dashboards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from statistics import fmean

from finemem.records import ScoredEpisode

OP_KINDS = ("insert", "update", "delete", "skip", "invalid")


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return fmean(xs) if xs else 0.0


def op_mix(episodes: Sequence) -> dict[str, float]:
    """Share of each operation kind among all ops, and the valid-call rate (SKIP counts as valid)."""
    counts: Counter[str] = Counter()
    valid = total = 0
    for ep in episodes:
        for s in ep.steps:
            for op in s.ops:
                kind = op.op if op.valid else "invalid"
                counts[kind if kind in OP_KINDS else "invalid"] += 1
                valid += int(op.valid)
                total += 1
    out = {f"ops/{k}": counts[k] / total if total else 0.0 for k in OP_KINDS}
    out["ops/valid_call_rate"] = valid / total if total else 0.0
    return out


def invalid_reasons(episodes: Sequence) -> dict[str, int]:
    """Count of refused ops by kind (`finemem.memory.refusal_kind`: duplicate, unknown_id, unparsable,
    truncated, ...), largest first: what the valid-call rate alone does not say."""
    from finemem.memory import refusal_kind

    counts = Counter(refusal_kind(op.reason) for ep in episodes for s in ep.steps for op in s.ops if not op.valid)
    return dict(counts.most_common())


def episode_metrics(episodes: Sequence) -> dict[str, float]:
    """Metrics that need only episodes (rollout side): op mix, memory tokens, generation lengths."""
    out = op_mix(episodes)
    n_ops = sum(len(s.ops) for ep in episodes for s in ep.steps)
    for kind, count in invalid_reasons(episodes).items():  # the invalid share split by cause
        out[f"ops_invalid/{kind}"] = count / n_ops
    out["memory/final_tokens"] = _mean(ep.steps[-1].memory_tokens for ep in episodes if ep.steps)
    out["memory/final_items"] = _mean(len(ep.steps[-1].memory) for ep in episodes if ep.steps)
    out["rollout/response_tokens"] = _mean(len(s.response_ids) for ep in episodes for s in ep.steps)
    out["rollout/truncated_share"] = _mean(float(s.finish_reason == "length") for ep in episodes for s in ep.steps)
    steps = [len(ep.steps) for ep in episodes]
    out["rollout/ops_per_step"] = (sum(len(s.ops) for ep in episodes for s in ep.steps) / sum(steps)) if sum(steps) else 0.0
    return out


def scored_metrics(scored: Sequence[ScoredEpisode], advantages: Sequence[Sequence[float]] | None = None,
                   max_steps_logged: int = 16) -> dict[str, float]:
    """Reward-side metrics over scored episodes; `advantages[i]` are episode i's per-step advantages."""
    out: dict[str, float] = {}
    if not scored:
        return out
    out["reward/mean"] = _mean(r for s in scored for r in s.rewards)
    out["reward/return_mean"] = _mean(sum(s.rewards) for s in scored)
    out["qa/global_accuracy"] = _mean(s.global_score for s in scored)
    names = sorted({k for s in scored for k in s.components})
    for name in names:
        out[f"reward/{name}"] = _mean(v for s in scored for v in s.components.get(name, []))
    t_max = min(max_steps_logged, max(len(s.rewards) for s in scored))
    for t in range(t_max):
        vals = [s.rewards[t] for s in scored if len(s.rewards) > t]
        out[f"reward_by_step/{t + 1}"] = _mean(vals)
        if advantages is not None:
            avals = [a[t] for a in advantages if len(a) > t]
            out[f"advantage_by_step/{t + 1}"] = _mean(avals)
    stat_names = sorted({k for s in scored for k in s.stats})
    for name in stat_names:
        out[f"reward_stats/{name}"] = _mean(s.stats[name] for s in scored if name in s.stats)
    out.update(answerer_metrics(scored))
    out.update(episode_metrics([s.episode for s in scored]))
    return out


def answerer_metrics(scored: Sequence[ScoredEpisode]) -> dict[str, float]:
    """Answerer requests per episode, the calls actually sent, and the request cache's hit rate
    over the batch (requests answered without a call / all requests)."""
    requests = sum(s.stats.get("answers", 0.0) for s in scored)
    hits = sum(s.stats.get("answer_cache_hits", 0.0) for s in scored)
    return {
        "answerer/requests_per_episode": requests / len(scored),
        "answerer/calls_per_episode": (requests - hits) / len(scored),
        "answerer/cache_hit_rate": hits / requests if requests else 0.0,
    }
