"""Resolve where every role runs, and refuse configs that cannot work before anything starts.

Roles: learner ranks (DeepSpeed), rollout engines (vLLM, tensor-parallel), reward actors, and the
answerer server (`vllm serve`, optional). On CPU everything shares the local cores; on GPU every
GPU is given to exactly one role, learner first, then engines, then the answerer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finemem.config import ConfigError


@dataclass
class Placement:
    device: str  # "cpu" | "cuda"
    learner_gpus: list[list[int]] = field(default_factory=list)  # one list per rank
    engine_gpus: list[list[int]] = field(default_factory=list)  # one list per engine (TP group)
    answerer_gpus: list[int] = field(default_factory=list)
    num_reward_actors: int = 1

    def describe(self) -> str:
        if self.device == "cpu":
            return (f"cpu: {len(self.learner_gpus) or 1} learner rank(s), {len(self.engine_gpus) or 1} engine(s), "
                    f"{self.num_reward_actors} reward actor(s)")
        return (f"cuda: learner ranks on GPUs {self.learner_gpus}, engines on {self.engine_gpus}, "
                f"answerer on {self.answerer_gpus or 'an external endpoint'}, {self.num_reward_actors} reward actors")


def validate(cfg, gpus_available: int | None = None) -> list[str]:
    """Everything that makes the config unworkable, each with what to change. Empty list: fine."""
    problems: list[str] = []
    if cfg.rollout.group_size < 2:
        problems.append(f"rollout.group_size={cfg.rollout.group_size}: GRPO needs at least 2 rollouts per "
                        "instance; set rollout.group_size=2 or more (8 in the paper)")
    model_path = Path(cfg.model.path)
    if not (model_path / "config.json").is_file():
        problems.append(f"model.path={cfg.model.path}: no Hugging Face model folder there (config.json missing); "
                        "build the tiny policy with `finemem model init --out DIR` or point model.path at a local "
                        "checkout of the model")
    if cfg.algo.advantage not in ("step_group", "pooled", "outcome"):
        problems.append(f"algo.advantage={cfg.algo.advantage}: choose step_group, pooled or outcome")
    if cfg.reward.preset not in ("finemem", "outcome_only", "csr_only", "eara_only", "memalpha"):
        problems.append(f"reward.preset={cfg.reward.preset}: choose finemem, outcome_only, csr_only, eara_only "
                        "or memalpha")
    if cfg.learner.num_ranks < 1 or cfg.rollout.num_engines < 1:
        problems.append("learner.num_ranks and rollout.num_engines must be at least 1")
    if cfg.algo.max_staleness < 0:
        problems.append("algo.max_staleness must be >= 0 (0 = fully on-policy)")
    if cfg.algo.ppo_epochs < 1 or cfg.algo.mini_batches < 1:
        problems.append(f"algo.ppo_epochs={cfg.algo.ppo_epochs}, algo.mini_batches={cfg.algo.mini_batches}: "
                        "both must be >= 1 (1 and 1 = one optimizer step per training step)")
    elif cfg.algo.mini_batches > cfg.learner.instances_per_step * cfg.rollout.group_size:
        problems.append(f"algo.mini_batches={cfg.algo.mini_batches} is more than the rollouts of a step "
                        f"(learner.instances_per_step x rollout.group_size = "
                        f"{cfg.learner.instances_per_step * cfg.rollout.group_size}); lower it")
    c = cfg.cluster
    if c.num_gpus > 0:
        need_learner = cfg.learner.num_ranks
        need_engines = cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
        if c.learner_gpus != need_learner:
            problems.append(f"cluster.learner_gpus={c.learner_gpus} but learner.num_ranks={need_learner}: "
                            "one GPU per learner rank; make them equal")
        if c.rollout_gpus != need_engines:
            problems.append(f"cluster.rollout_gpus={c.rollout_gpus} but rollout.num_engines x "
                            f"rollout.tensor_parallel_size = {need_engines}; make them equal")
        if c.answerer_serve and c.answerer_gpus < c.answerer_tensor_parallel:
            problems.append(f"cluster.answerer_gpus={c.answerer_gpus} < cluster.answerer_tensor_parallel="
                            f"{c.answerer_tensor_parallel}")
        total = c.learner_gpus + c.rollout_gpus + (c.answerer_gpus if c.answerer_serve else 0)
        if total > c.num_gpus:
            problems.append(f"roles ask for {total} GPUs (learner {c.learner_gpus} + rollout {c.rollout_gpus} + "
                            f"answerer {c.answerer_gpus if c.answerer_serve else 0}) but cluster.num_gpus="
                            f"{c.num_gpus}")
        if gpus_available is not None and c.num_gpus > gpus_available:
            problems.append(f"cluster.num_gpus={c.num_gpus} but only {gpus_available} GPU(s) are present; "
                            f"use a smaller cluster preset or set cluster.num_gpus={gpus_available}")
    return problems


def resolve(cfg, gpus_available: int | None = None) -> Placement:
    """The placement for `cfg`; raises ConfigError listing every problem (what to change)."""
    problems = validate(cfg, gpus_available)
    if problems:
        raise ConfigError("this configuration cannot run:\n  - " + "\n  - ".join(problems))
    c = cfg.cluster
    if c.num_gpus == 0:
        return Placement(device="cpu", learner_gpus=[[] for _ in range(cfg.learner.num_ranks)],
                         engine_gpus=[[] for _ in range(cfg.rollout.num_engines)],
                         num_reward_actors=cfg.reward.num_actors)
    next_gpu = 0

    def take(n: int) -> list[int]:
        nonlocal next_gpu
        ids = list(range(next_gpu, next_gpu + n))
        next_gpu += n
        return ids

    learner = [take(1) for _ in range(cfg.learner.num_ranks)]
    engines = [take(cfg.rollout.tensor_parallel_size) for _ in range(cfg.rollout.num_engines)]
    answerer = take(c.answerer_gpus) if c.answerer_serve else []
    return Placement(device="cuda", learner_gpus=learner, engine_gpus=engines, answerer_gpus=answerer,
                     num_reward_actors=cfg.reward.num_actors)
