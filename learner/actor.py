"""DeepSpeed learner: one Ray actor per data-parallel rank, and the driver-side group handle.

A training step is ONE optimizer step over the whole batch of samples per PPO epoch, or, with
`algo.mini_batches=n`, n optimizer steps over n mini-batches of whole rollouts (each weighted as a
batch of its own: `learner.batching.split_mini_batches`). A (mini-)batch's samples
are packed into token-budgeted micro-batches, dealt round-robin to the ranks, and each rank runs
forward/backward on its share, accumulating gradients. DeepSpeed runs with
`managed_gradient_accumulation=false`: `backward()` only accumulates, `step()` is the boundary, so
the number of micro-batches may change from step to step. The loss of a micro-batch is a plain sum
with weights precomputed over the whole batch (`learner.loss`), and DeepSpeed averages gradients
over the ranks, so each rank's loss is multiplied by the world size: the update equals that of one
big batch on one rank (up to float summation order).

Devices: NCCL and `cuda:0` when CUDA is visible (Ray gives each rank actor its own GPU), else gloo on
CPU. The policy is loaded in fp32; `model.dtype=bfloat16` turns on DeepSpeed's bf16 mode (fp32
master weights). The reference policy is a frozen copy of the initial weights (`model.path`),
used for the KL term when `learner.use_reference` is on; it is not sharded (fine for the 4B policy
on 80 GB GPUs; a ZeRO-3 inference engine would be the next step for larger models).

Usage from the driver:
    group = LearnerGroup(cfg)                  # starts cfg.learner.num_ranks actors, joins them
    metrics = group.train_step(samples)        # list[TrainSample] from learner.batching
    group.publish_weights(engine_actors)       # object-store weight sync (rollout/weight_sync.py)
    path = group.save_checkpoint(run_dir, client_state={"data_cursor": ...})
    client_state = group.load_checkpoint(latest_checkpoint(run_dir))
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray

from learner.batching import TrainSample, collate, make_micro_batches, split_for_ranks, split_mini_batches
from learner.checkpoint import (
    begin_checkpoint,
    capture_rng_state,
    finish_checkpoint,
    latest_checkpoint,
    partial_dir,
    read_state,
    restore_rng_state,
    write_state,
)
from learner.loss import merge_loss_metrics, policy_loss, sequence_logprobs

DS_TAG = "state"  # DeepSpeed's checkpoint tag inside <ckpt>/deepspeed/
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_MODEL_CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "constant") -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    Linear warm-up reaching 1 at the end of `warmup_steps` (the first step already moves, at
    1/warmup_steps), then `constant` (1) or `cosine` (half a cosine from 1 down to 0 at `total_steps`).
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"learner.lr_schedule={schedule!r}: choose constant or cosine")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed on CPU from compiling its shared-memory communication op.

    On the CPU accelerator `deepspeed.init_distributed` builds `deepspeed_shm_comm` (a C++ op,
    about 50 s of compiling on 2 cores, once per install), which serves only
    `inference_all_reduce` (tensor-parallel inference in `module_inject`). Training reduces
    gradients through the gloo process group either way. DeepSpeed reads op compatibility from
    the `deepspeed.ops.__compatible_ops__` dict, which it keeps for such edits.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _as_config(cfg):
    """A validated FineMemConfig (OmegaConf) from a config object or a plain dict."""
    from omegaconf import OmegaConf

    from finemem.config import FineMemConfig

    return OmegaConf.merge(OmegaConf.structured(FineMemConfig), cfg)


def _as_samples(samples) -> list[TrainSample]:
    out = [s if isinstance(s, TrainSample) else TrainSample.from_dict(s) for s in samples]
    if not out:
        raise ValueError("train_step: no samples")
    total = sum(s.loss_weight * len(s.response_ids) for s in out)
    if not math.isclose(total, 1.0, rel_tol=1e-4):
        raise ValueError(
            f"train_step: the samples' loss weights sum to {total:.6g} over their tokens, not 1; "
            "build them with learner.batching.samples_from_groups (or call assign_loss_weights on the "
            "whole step batch)"
        )
    return out


class LearnerWorker:
    """One data-parallel rank. Construct, then `setup(master_addr, master_port)` on every rank together."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, model_path: str | None = None):
        self.cfg = _as_config(cfg)
        self.rank, self.world_size = int(rank), int(world_size)
        self.model_path = str(model_path or self.cfg.model.path)
        self.engine = None
        self.ref_model = None
        self.step = 0  # training steps done (one per train_step call)
        self.version = 0  # policy version of the current weights (0 = the initial weights)

    # ---- setup --------------------------------------------------------------------------------
    def node_address(self) -> str:
        """This actor's node IP (rank 0's is the rendezvous address)."""
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        from rollout.weight_sync import free_port

        return free_port()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group, load policy and reference, build the DeepSpeed engine."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        os.environ.update(
            MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(self.rank),
            LOCAL_RANK="0", WORLD_SIZE=str(self.world_size),
        )
        self.device = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif int(self.cfg.learner.cpu_threads) > 0:
            # when the rollout actor sleeps while a batch trains (algo.max_staleness=0) the learner can use
            # more cores than Ray reserved for it; with overlap, more threads oversubscribe a small CPU
            # (measured in the demo: see conf/experiment/demo.yaml)
            torch.set_num_threads(int(self.cfg.learner.cpu_threads))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cpu":
            skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend)
        t_dist = time.perf_counter()

        lc = self.cfg.learner
        policy = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        if lc.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        policy.train()
        self.pad_id = int(getattr(policy.config, "pad_token_id", None) or 0)  # masked out anyway
        bf16 = self.cfg.model.dtype == "bfloat16"
        if lc.use_reference:
            ref = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=torch.bfloat16 if bf16 else torch.float32
            )
            self.ref_model = ref.to(self.device).eval().requires_grad_(False)

        # one scheduler step per optimizer step
        total = max(1, int(lc.total_steps) * int(self.cfg.algo.ppo_epochs) * int(self.cfg.algo.mini_batches))
        warmup = math.ceil(lc.warmup_ratio * total)
        schedule = lc.lr_schedule

        def make_scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, total, warmup, schedule)
            )

        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=lc.lr, weight_decay=lc.weight_decay
        )
        zero: dict[str, Any] = {"stage": int(lc.zero_stage)}
        if lc.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # micro-batches are token-budgeted, not counted
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # step() is the boundary, any number of backwards
            "gradient_clipping": float(lc.grad_clip),
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=make_scheduler, config=ds_config
        )
        return {
            "rank": self.rank, "device": str(self.device), "backend": backend, "torch_threads": torch.get_num_threads(),
            "init_distributed_s": t_dist - t0, "setup_s": time.perf_counter() - t0,
        }

    # ---- training -----------------------------------------------------------------------------
    def train_step(self, samples) -> dict[str, float]:
        """One training step over the whole batch: `algo.ppo_epochs` x `algo.mini_batches` optimizer steps.

        Every rank gets the same full sample list and trains on its share of each mini-batch's
        micro-batches. Returns metrics reduced over all ranks (identical on every rank); the loss
        terms are means over the optimizer steps.
        """
        import torch

        t0 = time.perf_counter()
        samples = _as_samples(samples)
        minis = split_mini_batches(samples, int(self.cfg.algo.mini_batches))
        budget = int(self.cfg.learner.micro_batch_tokens)
        micro = [make_micro_batches(mini, budget) for mini in minis]
        plans = [(mini, split_for_ranks(m, self.world_size)[self.rank]) for mini, m in zip(minis, micro)]
        epochs = max(1, int(self.cfg.algo.ppo_epochs))
        clip, kl_coef = float(self.cfg.algo.clip), float(self.cfg.algo.kl_coef)
        share_prefix = bool(self.cfg.learner.share_prefix)
        ref_cache: dict[tuple[int, int], torch.Tensor] = {}
        parts: list[dict[str, float]] = []
        entropy_sum = 0.0
        grad_norms, lrs = [], []
        for _ in range(epochs):
            for j, (mini, mine) in enumerate(plans):
                for k, idx in enumerate(mine):
                    batch = collate([mini[i] for i in idx], self.pad_id, self.device)
                    logp, entropy = sequence_logprobs(
                        self.engine, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                        with_entropy=True, share_prefix=share_prefix,
                    )
                    ref = None
                    if self.ref_model is not None:
                        if (j, k) not in ref_cache:
                            with torch.no_grad():
                                ref_cache[j, k] = sequence_logprobs(
                                    self.ref_model, batch["input_ids"], batch["attention_mask"],
                                    batch["response_mask"], share_prefix=share_prefix,
                                ).float()
                        ref = ref_cache[j, k]
                    loss, m = policy_loss(
                        logp, batch["old_logprobs"], batch["advantages"], batch["token_weights"],
                        batch["response_mask"], ref_logprobs=ref, clip=clip, kl_coef=kl_coef,
                    )
                    if not idx:  # a padding micro-batch: zero weight, counts no tokens
                        m = {**m, "tokens": 0.0}
                    else:
                        entropy_sum += float(entropy[batch["response_mask"]].sum())
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    parts.append(m)
                lrs.append(float(self.engine.get_lr()[0]))
                self.engine.step()
                norm = self.engine.get_global_grad_norm()  # before clipping; None without ZeRO (stage 0)
                if norm is not None:
                    grad_norms.append(float(norm))
        self.step += 1
        self.version += 1

        local = merge_loss_metrics(parts)
        metrics = self._reduce(local, entropy_sum, epochs, len(plans))
        versions = [s.policy_version for s in samples]
        if grad_norms:
            metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics.update(
            {
                "lr": lrs[-1],
                "optimizer_steps": float(len(lrs)),
                "micro_batches": float(sum(len(m) for m in micro)),
                "samples": float(len(samples)),
                "sample_staleness_max": float(self.version - 1 - min(versions)),
                "step": float(self.step),
                "policy_version": float(self.version),
                "step_time_s": time.perf_counter() - t0,
            }
        )
        return metrics

    def _reduce(self, local: dict[str, float], entropy_sum: float, epochs: int, minis: int) -> dict[str, float]:
        """Sum the additive metrics over ranks; loss terms as means per optimizer step, tokens per epoch.

        Each mini-batch's loss is a mean over its own rollouts, so the sum over `epochs x minis`
        optimizer steps is divided by that count.
        """
        import torch
        import torch.distributed as dist

        tokens = local["tokens"]
        sums = torch.tensor(
            [local["loss"], local["pg_loss"], local["kl"], tokens, local["clip_frac"] * tokens,
             local["ratio_mean"] * tokens, entropy_sum],
            dtype=torch.float64, device=self.device,
        )
        peak = torch.tensor([local["ratio_max"]], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        loss, pg, kl, tok, clipped, ratio, ent = sums.tolist()
        steps = epochs * minis
        return {
            "loss": loss / steps,
            "pg_loss": pg / steps,
            "kl": kl / steps,
            "response_tokens": tok / epochs,
            "clip_frac": clipped / tok if tok else 0.0,
            "ratio_mean": ratio / tok if tok else 0.0,
            "ratio_max": float(peak.item()),
            "entropy": ent / tok if tok else 0.0,
        }

    # ---- weights ------------------------------------------------------------------------------
    def export_weights(self, dtype: str | None = None) -> dict[str, Any]:
        """The policy as an HF-named CPU state dict on rank 0 ({} on other ranks).

        A tied `lm_head` is left out (see `rollout.weight_sync.export_state_dict`). Under ZeRO-3 the
        parameters are gathered first, which every rank must join: call it on all ranks.
        """
        import torch

        from rollout.weight_sync import export_state_dict

        torch_dtype = getattr(torch, dtype) if dtype else None
        module = self.engine.module
        if int(self.cfg.learner.zero_stage) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return export_state_dict(module, torch_dtype) if self.rank == 0 else {}
        return export_state_dict(module, torch_dtype) if self.rank == 0 else {}

    def policy_version(self) -> int:
        return self.version

    def state(self) -> dict[str, int]:
        return {"step": self.step, "policy_version": self.version, "rank": self.rank}

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, run_dir: str, client_state: dict[str, Any] | None = None,
                        keep: int | None = None) -> str:
        """Save DeepSpeed state, an HF folder and `state.json` under `<run_dir>/ckpt/step_XXXXXX/`.

        Collective: call on every rank. `client_state` (JSON-able: data-order cursor, trainer
        counters, ...) comes back from `load_checkpoint`. Returns the checkpoint path.
        """
        import torch.distributed as dist

        keep = int(self.cfg.learner.keep_checkpoints) if keep is None else keep
        if self.rank == 0:
            begin_checkpoint(run_dir, self.step)
        dist.barrier()
        path = partial_dir(run_dir, self.step)
        self.engine.save_checkpoint(str(path / "deepspeed"), tag=DS_TAG, client_state={}, save_latest=False)
        weights = self.export_weights()
        rng_states: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng_states, capture_rng_state())
        final = ""
        if self.rank == 0:
            self._save_hf(path / "hf", weights)
            write_state(path, {
                "step": self.step,
                "policy_version": self.version,
                "world_size": self.world_size,
                "zero_stage": int(self.cfg.learner.zero_stage),
                "model_path": self.model_path,
                "client_state": client_state or {},
                "rng": rng_states,
            })
            final = str(finish_checkpoint(run_dir, self.step, keep=keep))
        dist.barrier()
        return final

    def _save_hf(self, out: Path, weights: dict[str, Any]) -> None:
        """The policy as a loadable HF folder, with the tokenizer files of the initial model."""
        self.engine.module.save_pretrained(str(out), state_dict=weights)
        for f in Path(self.model_path).iterdir():
            wanted = f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in _MODEL_CONFIG_FILES
            if wanted and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Resume exactly: weights, optimizer and lr-schedule state, step, policy version, RNG.

        `path` is a checkpoint folder or a run directory (its latest complete checkpoint).
        Collective: call on every rank. Returns the saved `client_state`.
        """
        ckpt = Path(path)
        if not (ckpt / "state.json").is_file():
            found = latest_checkpoint(ckpt)
            if found is None:
                raise FileNotFoundError(f"{path}: no complete checkpoint (ckpt/step_*/COMPLETE) to resume from")
            ckpt = found
        state = read_state(ckpt)
        if state["world_size"] != self.world_size or state["zero_stage"] != int(self.cfg.learner.zero_stage):
            raise ValueError(
                f"{ckpt}: saved with world_size={state['world_size']} zero_stage={state['zero_stage']}, "
                f"resuming with world_size={self.world_size} zero_stage={self.cfg.learner.zero_stage}; "
                "DeepSpeed's ZeRO shards need the same layout (start from its hf/ folder otherwise)"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(ckpt / "deepspeed"), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"{ckpt / 'deepspeed'}: DeepSpeed found no checkpoint with tag {DS_TAG!r}")
        self.step = int(state["step"])
        self.version = int(state["policy_version"])
        restore_rng_state(state["rng"][self.rank])
        return dict(state["client_state"])

    # ---- GPU weight sync (NCCL; written without a GPU, not yet run) ----------------------------
    def connect_engines_nccl(self, engines: list) -> dict[str, Any]:
        """Rank 0 joins every engine's workers in one NCCL group (`rollout.weight_sync.NCCLWeightSender`)."""
        if self.rank != 0:
            return {}
        from rollout.weight_sync import NCCLWeightSender

        self._sender = NCCLWeightSender(engines)
        return self._sender.connect()

    def publish_weights_nccl(self, wire_dtype: str = "bfloat16") -> dict[str, Any]:
        """Broadcast the current weights to the connected engines and set their policy version.

        Collective under ZeRO-3 (the export gathers); the other ranks return {}.
        """
        from rollout.weight_sync import module_param_specs

        weights = self.export_weights()
        if self.rank != 0:
            return {}
        specs = module_param_specs(self.engine.module, wire_dtype)
        return self._sender.send(specs, ((s.name, weights[s.name]) for s in specs), self.version)


LearnerActor = ray.remote(LearnerWorker)


class LearnerGroup:
    """Driver-side handle on all learner ranks: every call goes to every rank, rank 0 answers."""

    def __init__(self, cfg, model_path: str | None = None, num_cpus_per_rank: float = 1,
                 num_gpus_per_rank: float | None = None):
        cfg = _as_config(cfg)
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(cfg, resolve=True)
        self.world_size = int(cfg.learner.num_ranks)
        gpus = num_gpus_per_rank if num_gpus_per_rank is not None else (1 if cfg.cluster.learner_gpus > 0 else 0)
        self.actors = [
            LearnerActor.options(num_cpus=num_cpus_per_rank, num_gpus=gpus).remote(
                plain, rank, self.world_size, model_path
            )
            for rank in range(self.world_size)
        ]
        addr = ray.get(self.actors[0].node_address.remote())
        port = ray.get(self.actors[0].free_port.remote())
        self.setup_info = ray.get([a.setup.remote(addr, port) for a in self.actors])

    def _all(self, method: str, *args, **kwargs) -> list:
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        ref = ray.put(list(samples))
        return self._all("train_step", ref)[0]

    def export_weights(self, dtype: str | None = None):
        """An ObjectRef to rank 0's HF state dict (every rank joins, for ZeRO-3)."""
        refs = [a.export_weights.remote(dtype) for a in self.actors]
        ray.get(refs[1:])
        return refs[0]

    def publish_weights(self, engines: list, dtype: str | None = None) -> int:
        """Object-store weight sync: every engine gets `update_weights([ref], version)`.

        The ObjectRef is wrapped in a list so Ray hands the engine the ref, not the tensors; the
        engine fetches it once. Returns the published policy version.
        """
        ref = self.export_weights(dtype)
        version = self.policy_version()
        ray.get([engine.update_weights.remote([ref], version) for engine in engines])
        return version

    def connect_engines_nccl(self, engines: list) -> dict[str, Any]:
        """GPU: rank 0 joins the engines' NCCL weight-transfer group (once, before training)."""
        return self._all("connect_engines_nccl", engines)[0]

    def publish_weights_nccl(self, engines: list) -> int:
        """GPU weight sync: NCCL broadcast from rank 0; every rank joins (ZeRO-3 gathers)."""
        self._all("publish_weights_nccl")
        return self.policy_version()

    def policy_version(self) -> int:
        return ray.get(self.actors[0].policy_version.remote())

    def save_checkpoint(self, run_dir: str, client_state: dict[str, Any] | None = None) -> str:
        return self._all("save_checkpoint", str(run_dir), client_state)[0]

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self._all("load_checkpoint", str(path))[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
