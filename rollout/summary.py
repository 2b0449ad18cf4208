"""Summary statistics of a batch of episodes: what `finemem rollout`, the trainer and eval print and log.

Definitions (one place, so every command reports the same numbers):
- valid_call_rate: valid operations / all operations over every step (a SKIP is one valid op;
  a truncated response adds one invalid op, see `rollout.episode`).
- ops_per_step/<kind>: mean count per step of each op kind (insert, update, delete, skip, invalid),
  counting attempted ops whether valid or not.
- invalid/<kind>: refused ops of each kind (`finemem.memory.refusal_kind`) per op, so that the
  invalid share splits into its causes (duplicate, unknown_id, unparsable, truncated, ...).
- memory_tokens_final: mean over episodes of the final memory's token length.
- gen_tokens_per_s: generated (response) tokens / wall seconds of the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from finemem.records import Episode
from finemem.train_metrics import invalid_reasons

OP_KINDS = ("insert", "update", "delete", "skip", "invalid")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def summarize_episodes(episodes: Sequence[Episode], wall_seconds: float | None = None) -> dict[str, float]:
    """A flat dict of floats (ready for `Tracker.log`) over the episodes' steps."""
    steps = [s for ep in episodes for s in ep.steps]
    ops = [op for s in steps for op in s.ops]
    n_steps = len(steps)
    kinds = Counter(op.op for op in ops)
    finish = Counter(s.finish_reason for s in steps)
    gen_tokens = sum(len(s.response_ids) for s in steps)
    out: dict[str, float] = {
        "episodes": float(len(episodes)),
        "steps": float(n_steps),
        "ops": float(len(ops)),
        "valid_call_rate": (sum(op.valid for op in ops) / len(ops)) if ops else 0.0,
        "ops_per_step": (len(ops) / n_steps) if n_steps else 0.0,
        "memory_tokens_final": _mean([ep.steps[-1].memory_tokens for ep in episodes if ep.steps]),
        "memory_items_final": _mean([len(ep.steps[-1].memory) for ep in episodes if ep.steps]),
        "prompt_tokens_mean": _mean([len(s.prompt_ids) for s in steps]),
        "response_tokens_mean": _mean([len(s.response_ids) for s in steps]),
        "gen_tokens": float(gen_tokens),
        "episode_errors": float(sum(ep.error is not None for ep in episodes)),
    }
    for kind in OP_KINDS:
        out[f"ops_per_step/{kind}"] = (kinds.get(kind, 0) / n_steps) if n_steps else 0.0
    for kind, count in invalid_reasons(episodes).items():
        out[f"invalid/{kind}"] = count / len(ops)
    for reason, count in sorted(finish.items()):
        out[f"finish/{reason}"] = count / n_steps
    for key in ("prompt_s", "generate_s", "apply_s"):
        out[f"time/{key}_mean"] = _mean([s.timings[key] for s in steps if key in s.timings])
    if wall_seconds is not None:
        out["wall_s"] = float(wall_seconds)
        out["gen_tokens_per_s"] = gen_tokens / wall_seconds if wall_seconds > 0 else 0.0
    return out


def format_summary(summary: dict[str, float]) -> str:
    """Human-readable lines, one metric each (`key: value`)."""
    lines = []
    for key, value in summary.items():
        text = f"{value:.0f}" if float(value).is_integer() and abs(value) < 1e12 else f"{value:.4g}"
        lines.append(f"{key}: {text}")
    return "\n".join(lines)
