"""`finemem train`: the controller that wires rollout, reward and learner on a Ray cluster.

Data flow of a step (architecture.md):

    producer thread                                   training loop (this thread)
    ---------------                                   ---------------------------
    sampler -> batch k of instances                   take one batch of groups from the queue
    rollout actors: run_group (G episodes each)       drop samples older than the staleness bound
    reward pool: score episodes as they finish        advantages -> samples -> learner.train_step
    all G scored -> queue.put((k, pos, group)) --->   publish weights -> engines (version v+1)
                                                      log, checkpoint, wake the producer

Admission control keeps rollouts at most `algo.max_staleness` policy versions behind: batch k
(trained at learner version k-1) is only started once the engines hold version >= k-1-s. With
the default s=1, rollout of step k+1 overlaps training of step k. Samples that are still too old
when consumed (an episode that straddled a sync) are dropped and counted.

The queue is a bounded `ray.util.queue.Queue`, so a slow learner back-pressures the producer.
Ctrl-C once: finish the current step, checkpoint, stop (twice: stop now). `resume=RUN_DIR`
continues from the newest complete checkpoint with the same data order.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemem.cli import parse_command
from finemem.config import ConfigError, from_yaml_file, load_config, save_config, to_container
from finemem.records import Instance, ScoredEpisode
from finemem.sampler import InstanceSampler
from finemem.tracking import RunDir, Tracker, plot_curves


@dataclass
class _Shared:
    """State shared by the producer thread and the training loop (guarded by `cond`)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    engine_version: int = 0
    stop: bool = False
    error: BaseException | None = None
    sampler_after_batch: dict[int, dict[str, int]] = field(default_factory=dict)
    rollout_seconds: dict[int, float] = field(default_factory=dict)
    generated_tokens: dict[int, int] = field(default_factory=dict)


def _load_split(cfg, path: str, limit: int | None = None) -> list[Instance]:
    from finemem.data.readers import load_instances

    instances = load_instances(path, fmt=cfg.data.format, chunk_tokens=cfg.data.chunk_tokens,
                               skip_bad_rows=cfg.data.skip_bad_rows, max_instances=limit)
    if not instances:
        raise ConfigError(f"{path}: no instances")
    return instances


class Trainer:
    def __init__(self, cfg, run_dir: RunDir, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.shared = _Shared()
        self.interrupts = 0
        self.history: dict[str, Any] = {}

    # ---------------------------------------------------------------- setup
    def start(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from finemem.placement import resolve
        from finemem.prompts import make_token_counter
        from learner.actor import LearnerGroup
        from reward.pool import RewardPool
        from rollout.actor import create_rollout_actor

        cfg = self.cfg
        gpus = _cuda_count()
        self.placement = resolve(cfg, gpus_available=gpus if cfg.cluster.num_gpus else None)
        if not ray.is_initialized():
            if cfg.cluster.address:
                ray.init(address=cfg.cluster.address, runtime_env={"env_vars": _child_env()})
            else:
                ray.init(num_cpus=cfg.cluster.num_cpus or 4, include_dashboard=False,
                         runtime_env={"env_vars": _child_env()}, log_to_driver=False)
        self.train_instances = _load_split(cfg, cfg.data.train_path, cfg.data.max_instances)
        self.eval_instances = _load_split(cfg, cfg.data.eval_path, cfg.eval.instances or None)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.count_tokens = make_token_counter(tokenizer)
        if cfg.cluster.answerer_serve:
            from learner.answerer_server import start_answerer_server

            self.answerer_server = start_answerer_server(cfg, self.placement)
        on_gpu = self.placement.device == "cuda"
        self.engines = [create_rollout_actor(cfg, cfg.model.path, num_cpus=cfg.rollout.actor_num_cpus)
                        for _ in range(cfg.rollout.num_engines)]
        engine_start = [e.start.remote() for e in self.engines]
        self.learner = LearnerGroup(cfg, cfg.model.path, num_cpus_per_rank=cfg.learner.actor_num_cpus)
        self.pool = RewardPool(cfg, count_tokens=None)
        ray.get(engine_start)
        if on_gpu:
            self.learner.connect_engines_nccl(self.engines)
        self.queue = _make_queue(max(1, cfg.learner.instances_per_step) * max(1, cfg.algo.max_staleness))
        self.start_step = 0
        sampler_state = None
        if self.resume:
            from learner.checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(self.run_dir.path)
            if ckpt is None:
                raise ConfigError(f"resume={self.run_dir.path}: no complete checkpoint under {self.run_dir.ckpt_dir}")
            client = self.learner.load_checkpoint(str(ckpt))
            self.start_step = int(client["step"])
            sampler_state = client["sampler"]
            self.history = client.get("history", {})
            self._publish()
            print(f"finemem: resumed {self.run_dir.path} at step {self.start_step} from {ckpt}")
        self.sampler = (InstanceSampler.from_state(len(self.train_instances), cfg.run.seed, sampler_state)
                        if sampler_state else InstanceSampler(len(self.train_instances), cfg.run.seed))
        self.shared.engine_version = self.learner.policy_version()
        self.tracker = Tracker(self.run_dir, to_container(cfg), cfg.wandb, resume=self.resume)

    def _publish(self) -> float:
        t0 = time.perf_counter()
        if self.placement.device == "cuda":
            version = self.learner.publish_weights_nccl(self.engines)
        else:
            version = self.learner.publish_weights(self.engines)
        with self.shared.cond:
            self.shared.engine_version = version
            self.shared.cond.notify_all()
        return time.perf_counter() - t0

    # ------------------------------------------------------------- producer
    def _sampling(self, temperature: float | None = None) -> dict[str, Any]:
        r = self.cfg.rollout
        return {"max_tokens": r.max_response_tokens, "temperature": r.temperature if temperature is None else temperature,
                "top_p": r.top_p}

    def _produce(self) -> None:
        """Producer thread: batches of groups -> reward pool -> queue, under admission control."""
        import ray

        cfg, sh = self.cfg, self.shared
        per_step, G, s = cfg.learner.instances_per_step, cfg.rollout.group_size, cfg.algo.max_staleness
        batch = self.start_step + 1
        try:
            while batch <= cfg.learner.total_steps:
                oldest_allowed = batch - 1 - s
                with sh.cond:
                    sh.cond.wait_for(lambda: sh.stop or sh.engine_version >= oldest_allowed)  # noqa: B023
                    if sh.stop:
                        return
                t0 = time.perf_counter()
                indices = self.sampler.next_batch(per_step)
                sh.sampler_after_batch[batch] = self.sampler.state_dict()
                futures: dict[Any, str] = {}
                positions: dict[str, int] = {}  # group key -> its place in the sampled batch
                for pos, idx in enumerate(indices):
                    key = f"s{batch}-i{pos}"
                    positions[key] = pos
                    engine = self.engines[pos % len(self.engines)]
                    ids = [f"{key}-g{g}" for g in range(G)]
                    futures[engine.run_group.remote(self.train_instances[idx], G, ids, self._sampling())] = key
                groups: dict[str, list[ScoredEpisode]] = {}
                done_groups = 0
                tokens = 0
                while done_groups < per_step:
                    if sh.stop:
                        return
                    if futures:
                        ready, _ = ray.wait(list(futures), num_returns=1, timeout=0.05)
                        for ref in ready:
                            futures.pop(ref)
                            for ep in ray.get(ref):
                                tokens += sum(len(st.response_ids) for st in ep.steps)
                                self.pool.submit(ep)
                    for scored in self.pool.poll(timeout=0.0 if futures else 0.1):
                        key = scored.episode.episode_id.rsplit("-g", 1)[0]
                        groups.setdefault(key, []).append(scored)
                        if len(groups[key]) == G:
                            group = sorted(groups.pop(key), key=lambda x: x.episode.group_index)
                            self._put(batch, positions[key], group)
                            done_groups += 1
                sh.rollout_seconds[batch] = time.perf_counter() - t0
                sh.generated_tokens[batch] = tokens
                batch += 1
        except BaseException as e:  # noqa: BLE001 (any failure, Ctrl-C included, is surfaced by the training loop)
            sh.error = e
            with sh.cond:
                sh.cond.notify_all()

    def _put(self, batch: int, pos: int, group: list[ScoredEpisode]) -> None:
        from ray.util.queue import Full

        while not self.shared.stop:
            try:
                self.queue.put((batch, pos, group), timeout=0.5)
                return
            except Full:
                continue

    def _take_batch(self, step: int) -> list[list[ScoredEpisode]]:
        from ray.util.queue import Empty

        groups: list[tuple[int, list[ScoredEpisode]]] = []
        while len(groups) < self.cfg.learner.instances_per_step:
            if self.shared.error is not None:
                raise RuntimeError(f"rollout/reward producer failed: {self.shared.error!r}") from self.shared.error
            try:
                batch, pos, group = self.queue.get(timeout=0.5)
            except Empty:
                continue
            if batch != step:
                raise RuntimeError(f"queue order broken: expected batch {step}, got {batch}")
            groups.append((pos, group))
        # Groups arrive in completion order; train (and log) them in the sampler's order so a run
        # and its resume see identical batches.
        return [group for _, group in sorted(groups, key=lambda item: item[0])]

    # ------------------------------------------------------------- training
    def train(self) -> None:
        from tqdm import tqdm

        from finemem.advantages import compute_advantages
        from finemem.train_metrics import scored_metrics
        from learner.batching import assign_loss_weights, samples_from_groups

        cfg = self.cfg
        producer = threading.Thread(target=self._produce, name="finemem-producer", daemon=True)
        producer.start()
        bar = tqdm(total=cfg.learner.total_steps, initial=self.start_step, desc="GRPO", unit="step", dynamic_ncols=True)
        last_saved = self.start_step
        step = self.start_step
        try:
            for step in range(self.start_step + 1, cfg.learner.total_steps + 1):
                t_wait = time.perf_counter()
                depth = self.queue.qsize()
                groups = self._take_batch(step)
                wait_s = time.perf_counter() - t_wait
                version = self.shared.engine_version
                samples, stats = samples_from_groups(groups, cfg.algo.advantage, cfg.algo.norm, cfg.algo.epsilon,
                                                     cfg.algo.reward_to_go)
                fresh = [s for s in samples if version - s.policy_version <= cfg.algo.max_staleness]
                stale = len(samples) - len(fresh)
                lags = [version - s.policy_version for s in samples]
                if stale:
                    assign_loss_weights(fresh)
                t_train = time.perf_counter()
                learner_metrics = self.learner.train_step(fresh) if fresh else {}
                train_s = time.perf_counter() - t_train
                sync_s = self._publish()
                scored = [s for g in groups for s in g]
                advantages = [row for g in groups for row in compute_advantages(
                    [s.rewards for s in g], cfg.algo.advantage, cfg.algo.norm, cfg.algo.epsilon,
                    cfg.algo.reward_to_go)[0]]
                metrics = scored_metrics(scored, advantages)
                metrics.update({f"learner/{k}": v for k, v in learner_metrics.items()})
                metrics.update({f"batch/{k}": v for k, v in stats.items()})
                versions = [s.policy_version for s in samples]
                with open(self.run_dir.path / "data_order.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "instances": [g[0].episode.instance.instance_id
                                                                    for g in groups]}) + "\n")
                metrics.update({
                    "rollout/policy_version_min": min(versions) if versions else -1,
                    "rollout/policy_version_max": max(versions) if versions else -1,
                    "staleness/dropped_samples": stale,
                    "staleness/mean_lag": sum(lags) / len(lags) if lags else 0.0,
                    "staleness/max_lag": max(lags) if lags else 0,
                    "queue/depth_at_take": depth,
                    "time/wait_for_batch_s": wait_s,
                    "time/train_s": train_s,
                    "time/weight_sync_s": sync_s,
                    "time/rollout_batch_s": self.shared.rollout_seconds.get(step, 0.0),
                    "throughput/gen_tokens_per_s": self.shared.generated_tokens.get(step, 0)
                    / max(1e-9, self.shared.rollout_seconds.get(step, 0.0)),
                    "policy_version": version + 1,
                })
                metrics.update({f"reward_pool/{k}": v for k, v in self.pool.metrics().items()})
                self.tracker.log(metrics, step=step)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}",
                                acc=f"{metrics.get('qa/global_accuracy', 0):.2f}",
                                tok_s=f"{metrics['throughput/gen_tokens_per_s']:.0f}")
                if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0:
                    self._checkpoint(step)
                    last_saved = step
                if self.interrupts:
                    print("\nfinemem: interrupted; checkpointing and stopping (resume with "
                          f"`finemem train resume={self.run_dir.path}`)")
                    break
        finally:
            bar.close()
            with self.shared.cond:
                self.shared.stop = True
                self.shared.cond.notify_all()
            producer.join(timeout=30)
            if step > last_saved and self.shared.error is None:
                self._checkpoint(step)
        self.final_step = step

    def _checkpoint(self, step: int) -> None:
        client = {"step": step, "sampler": self.shared.sampler_after_batch[step],
                  "policy_version": self.shared.engine_version, "history": self.history}
        path = self.learner.save_checkpoint(str(self.run_dir.path), client)
        print(f"finemem: checkpoint step {step} -> {path}")

    # ----------------------------------------------------------- evaluation
    def evaluate(self, label: str) -> dict[str, float]:
        """Held-out evaluation with the engines' current policy (every question, final memory)."""
        from learner.evaluate import evaluate_on_engines

        result = evaluate_on_engines(self.engines, self.eval_instances, self.cfg, self.count_tokens,
                                     sampling=self._sampling(self.cfg.eval.temperature), label=label)
        self.history[f"eval_{label}"] = result
        (self.run_dir.path / f"eval_{label}.json").write_text(json.dumps(result, indent=2))
        return result

    def shutdown(self) -> None:
        import ray

        for fn in (lambda: self.tracker.close(), lambda: self.pool.shutdown(), lambda: self.learner.shutdown()):
            try:
                fn()
            except Exception as err:  # noqa: BLE001 (shut the other services down regardless)
                print(f"finemem: shutdown: {type(err).__name__}: {err}")
        for e in getattr(self, "engines", []):
            try:
                ray.get(e.shutdown.remote(), timeout=30)
            except Exception as err:  # noqa: BLE001 (a dead engine actor has nothing left to stop)
                print(f"finemem: engine shutdown: {type(err).__name__}: {err}")
        server = getattr(self, "answerer_server", None)
        if server is not None:
            server.stop()

    def plots(self) -> list[Path]:
        out = []
        for name, keys in {
            "learning_curve": ["reward/mean", "qa/global_accuracy", "reward/chunk", "reward/eara"],
            "memory_and_ops": ["memory/final_tokens", "ops/valid_call_rate", "ops/insert", "ops/skip"],
            "optimisation": ["learner/loss", "learner/kl", "learner/clip_frac", "batch/zero_variance_groups"],
            "timings": ["time/rollout_batch_s", "time/train_s", "time/weight_sync_s", "time/wait_for_batch_s"],
        }.items():
            p = plot_curves(self.run_dir.metrics_path, self.run_dir.plots_dir / f"{name}.png", keys, title=name)
            if p:
                out.append(p)
        return out


def _make_queue(maxsize: int):
    from ray.util.queue import Queue

    return Queue(maxsize=maxsize, actor_options={"num_cpus": 0})


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except (ImportError, RuntimeError):
        return 0


def _child_env() -> dict[str, str]:
    """Environment every Ray worker inherits: offline hub, the prebuilt DeepSpeed op, W&B mode."""
    keep = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def build_config(overrides: list[str]) -> tuple[Any, RunDir, bool]:
    """Resolve the config and run directory; `resume=RUN_DIR` reloads that run's saved config."""
    resume_dir = None
    rest = []
    for ov in overrides:
        if ov.startswith("resume="):
            resume_dir = ov.split("=", 1)[1]
        else:
            rest.append(ov)
    if resume_dir:
        run = RunDir(resume_dir)
        if not run.config_path.is_file():
            raise ConfigError(f"resume={resume_dir}: no config.yaml there (is it a finemem run directory?)")
        from omegaconf import OmegaConf

        cfg = from_yaml_file(run.config_path)
        if rest:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
        return cfg, run, True
    cfg = load_config(rest)
    run = RunDir.create(cfg.run.out_dir, cfg.run.name)
    save_config(cfg, run.config_path)
    return cfg, run, False


def run_training(cfg, run: RunDir, resume: bool, evaluate: bool = True) -> dict[str, Any]:
    """Start the services, evaluate before, train, evaluate after; always shuts down cleanly."""
    trainer = Trainer(cfg, run, resume)

    def on_sigint(signum, frame):
        trainer.interrupts += 1
        if trainer.interrupts > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        trainer.start()
        if evaluate and cfg.eval.before_training and not resume:
            trainer.evaluate("before")
        trainer.train()
        if evaluate and cfg.eval.after_training and not trainer.interrupts:
            trainer.evaluate("after")
        trainer.plots()
        return {"run_dir": str(run.path), "final_step": trainer.final_step, **trainer.history}
    finally:
        signal.signal(signal.SIGINT, previous)
        trainer.shutdown()


def cli(argv: list[str]) -> int:
    """`finemem train [key=value ...]` or `finemem train resume=RUN_DIR [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="finemem train", description=cli.__doc__)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation before and after")
    args, overrides = parse_command(parser, argv)
    cfg, run, resume = build_config(overrides)
    print(f"finemem: run directory {run.path}")
    result = run_training(cfg, run, resume, evaluate=not args.no_eval)
    from learner.evaluate import format_before_after

    if "eval_before" in result or "eval_after" in result:
        print(format_before_after(result.get("eval_before"), result.get("eval_after")))
    return 0
