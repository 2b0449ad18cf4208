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
    group.connect_engines_nccl(engine_actors)  # GPU: once; then, per update, straight from the device:
    group.publish_weights_nccl(engine_actors)  #   bucket by bucket (`stream_weights`), ZeRO-3 included
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
    CheckpointError,
    abandon_checkpoint,
    begin_checkpoint,
    capture_rng_state,
    finish_checkpoint,
    latest_checkpoint,
    partial_dir,
    read_state,
    restore_rng_state,
    verify_checkpoint,
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


def learner_device():
    """cuda:0 when this rank was given a GPU, else the CPU.

    Inside a Ray actor the GPU is the one Ray assigned (`ray.get_gpu_ids()`); a rank that asked for no
    GPU stays on the CPU even where CUDA is visible (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for
    actors with num_gpus=0, so `torch.cuda.is_available()` alone would put every CPU rank on cuda:0).
    Outside Ray (tests, scripts) any visible GPU is used.
    """
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if ray.is_initialized() and not ray.get_gpu_ids():
        return torch.device("cpu")
    return torch.device("cuda:0")


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


# ---- weight streaming: publishing to the engines and the CPU export ---------------------------
EXPORT_BUCKET_BYTES = 256 * 1024 * 1024  # a CPU export gathers (ZeRO-3) about this much at a time


def wire_dtype(model_dtype: str | None, module) -> str:
    """The dtype the engines hold the weights in: `model.dtype`, or the parameters' own for "auto"/None.

    The wire carries exactly that dtype: an fp32 engine gets fp32 (not a bf16 rounding of it), and a
    bf16 engine gets the bf16 parameters of DeepSpeed's bf16 mode with no cast.
    """
    import torch

    if model_dtype in (None, "", "auto"):
        return str(next(module.parameters()).dtype).removeprefix("torch.")
    dtype = getattr(torch, str(model_dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"model.dtype={model_dtype!r}: choose float32, bfloat16, float16 or auto")
    return str(model_dtype)


class CPUWeightCollector:
    """A weight sink with the sender's begin/send_bucket/end that keeps CPU copies (the object-store
    export and the HF checkpoint folder)."""

    def __init__(self, bucket_bytes: int = EXPORT_BUCKET_BYTES):
        self.bucket_bytes = int(bucket_bytes)
        self.tensors: dict[str, Any] = {}

    def begin(self, specs: list, version: int) -> list[list]:
        from rollout.weight_sync import plan_buckets

        return plan_buckets(list(specs), self.bucket_bytes)

    def send_bucket(self, pairs: list) -> None:
        for name, tensor in pairs:  # copies: under ZeRO-3 the gathered storage is freed after the bucket
            self.tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()

    def end(self) -> dict[str, float]:
        return {}


def _on_wire(param, spec):
    """The parameter itself (no copy), or one cast on its device when the wire dtype differs."""
    import torch

    from rollout.weight_sync import WeightSyncError

    t = param.detach()
    if tuple(t.shape) != tuple(spec.shape):
        raise WeightSyncError(f"{spec.name!r}: shape {tuple(t.shape)} != planned {tuple(spec.shape)} "
                              "(a ZeRO-3 parameter that was not gathered?)")
    dtype = getattr(torch, spec.dtype)
    return t if t.dtype == dtype else t.to(dtype)


def stream_weights(module, sender, version: int, dtype: str | None = None, *, rank: int = 0,
                   zero3: bool = False) -> dict[str, Any]:
    """Hand `module`'s parameters to `sender` bucket by bucket, straight from their device.

    `sender` (used on rank 0 only; None elsewhere) has the interface of
    `rollout.weight_sync.NCCLWeightSender`: `begin(specs, version) -> buckets`, then
    `send_bucket([(name, tensor), ...])` for each bucket in order, then `end() -> dict`. The tensors
    are the parameters themselves unless `dtype` (the wire dtype; None: the parameters' own) differs,
    so the sender must be done with them when `send_bucket` returns.

    Without ZeRO-3, rank 0 holds full parameters and does all the work; other ranks return at once.
    Under ZeRO-3 this is a collective that every rank must call: rank 0 broadcasts the bucket plan,
    then all ranks gather each bucket's parameters together, in plan order
    (`deepspeed.zero.GatheredParameters`, an all-gather), and rank 0 sends the bucket inside the
    gather. So at most one bucket is materialized at a time (plus the small parameters ZeRO-3 keeps
    resident after a forward). A failure on rank 0 stops its sending but not its gathers (the other
    ranks would wait forever in the next all-gather); it is raised after the last bucket.

    Returns this rank's report: `buckets` (indices of the buckets it gathered or sent), `peak_numel`
    (the most parameter elements materialized here at once: a memory high-water mark) and, on
    rank 0, `sender` (what `end()` returned).
    """
    import contextlib

    from rollout.weight_sync import hf_name, module_param_specs

    report: dict[str, Any] = {"rank": rank, "buckets": [], "peak_numel": 0, "sender": {}}
    if rank != 0 and not zero3:
        return report
    params = {hf_name(raw): p for raw, p in module.named_parameters()}
    planned: dict[str, Any] = {}
    plan: list[list[str]] | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            if sender is None:
                raise RuntimeError("no weight sender on rank 0: connect the engines first (connect_engines_nccl)")
            buckets = sender.begin(module_param_specs(module, dtype), int(version))
            planned = {s.name: s for bucket in buckets for s in bucket}
            plan = [[s.name for s in bucket] for bucket in buckets]
        except Exception as e:  # noqa: BLE001 (the other ranks must hear of it before rank 0 raises)
            error = e
    if zero3:
        import torch.distributed as dist

        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    if plan is None:  # rank 0 could not begin; it raises, the others have nothing to gather
        if error is not None:
            raise error
        return report

    def gathered(tensors):
        if not zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(tensors, modifier_rank=None)

    for index, names in enumerate(plan):
        with gathered([params[n] for n in names]):
            report["buckets"].append(index)
            resident = sum(p.numel() for p in module.parameters())  # a ZeRO-3 partition has numel 0
            report["peak_numel"] = max(report["peak_numel"], resident)
            if rank == 0 and error is None:
                try:
                    sender.send_bucket([(n, _on_wire(params[n], planned[n])) for n in names])
                except Exception as e:  # noqa: BLE001 (raised after the remaining gathers)
                    error = e
    if error is not None:
        raise error
    if rank == 0:
        report["sender"] = dict(sender.end() or {})
    return report


def _attempt(write, path: Path, step: int) -> str:
    """Run one checkpoint write; "" when it worked, else one line naming the path and the error.

    DeepSpeed and torch.save report a full disk as OSError or as RuntimeError without an errno;
    `describe_write_error` adds the free space in both cases.
    """
    from finemem.tracking import describe_write_error

    try:
        write()
    except CheckpointError as err:
        text = str(err)
        return text if text.startswith("checkpoint step") else f"checkpoint step {step}: {text}"
    except (OSError, RuntimeError) as err:
        where = getattr(err, "filename", None) or path
        return f"checkpoint step {step}: {describe_write_error(where, err)}"
    return ""


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
        self.device = learner_device()
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
        # Seeded from run.seed (per rank, as data-parallel dropout masks should differ), so any
        # randomness in training (dropout of a model that has it) is a function of the seed, not of
        # what this pooled Ray worker process ran before. Resume restores the saved states over it.
        torch.manual_seed(int(self.cfg.run.seed) * 1000 + self.rank)

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
        # the rollout's sampling temperature: the engine's logprobs are of the tempered distribution
        temperature = float(self.cfg.rollout.temperature)
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
                        with_entropy=True, share_prefix=share_prefix, temperature=temperature,
                    )
                    ref = None
                    if self.ref_model is not None:
                        if (j, k) not in ref_cache:
                            with torch.no_grad():
                                ref_cache[j, k] = sequence_logprobs(
                                    self.ref_model, batch["input_ids"], batch["attention_mask"],
                                    batch["response_mask"], share_prefix=share_prefix, temperature=temperature,
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
    def _zero3(self) -> bool:
        return int(self.cfg.learner.zero_stage) == 3

    def export_weights(self, dtype: str | None = None) -> dict[str, Any]:
        """The policy as an HF-named CPU state dict on rank 0 ({} on other ranks).

        The contents of `rollout.weight_sync.export_state_dict` (a tied `lm_head` left out, persistent
        buffers kept), built by `stream_weights` into a `CPUWeightCollector`: under ZeRO-3 the
        parameters are gathered bucket by bucket, never the whole model at once, and every rank must
        call it.
        """
        import torch

        from rollout.weight_sync import hf_name, is_tied

        module = self.engine.module
        collector = CPUWeightCollector() if self.rank == 0 else None
        stream_weights(module, collector, self.version, dtype, rank=self.rank, zero3=self._zero3())
        if collector is None:
            return {}
        out = collector.tensors
        torch_dtype = getattr(torch, dtype) if dtype else None
        param_names = {raw for raw, _ in module.named_parameters()}
        tied = is_tied(module)
        for raw, t in module.state_dict().items():  # persistent buffers: the parameters are in `out`
            name = hf_name(raw)
            if raw in param_names or (tied and name.startswith("lm_head.")):
                continue
            out[name] = t.detach().to(device="cpu", dtype=torch_dtype or t.dtype, copy=True).contiguous()
        return out

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

        Everything is written into `step_XXXXXX.partial/`; only `finish_checkpoint` (fsync,
        manifest, check, marker, rename) makes it a checkpoint. A write that fails (disk full,
        read-only) removes the partial folder and raises `CheckpointError` on every rank, naming
        the path and the errno: the ranks agree on the outcome instead of leaving the others
        waiting in a barrier for rank 0.
        """
        import torch.distributed as dist

        keep = int(self.cfg.learner.keep_checkpoints) if keep is None else keep
        step = self.step
        path = partial_dir(run_dir, step)
        failure = ""
        if self.rank == 0:
            failure = _attempt(lambda: begin_checkpoint(run_dir, step), path, step)
        failure = self._agree(failure)
        if not failure:
            # DeepSpeed's save has collectives of its own: a rank failing inside it alone is not
            # covered (every rank writes to the same file system, so a full disk fails them all).
            failure = _attempt(lambda: self.engine.save_checkpoint(
                str(path / "deepspeed"), tag=DS_TAG, client_state={}, save_latest=False), path / "deepspeed", step)
            failure = self._agree(failure)
        final = ""
        if not failure:
            weights = self.export_weights()
            rng_states: list[Any] = [None] * self.world_size
            dist.all_gather_object(rng_states, capture_rng_state())
            if self.rank == 0:
                def write_rest() -> None:
                    nonlocal final
                    self._save_hf(path / "hf", weights)
                    write_state(path, {
                        "step": step,
                        "policy_version": self.version,
                        "world_size": self.world_size,
                        "zero_stage": int(self.cfg.learner.zero_stage),
                        "model_path": self.model_path,
                        "client_state": client_state or {},
                        "rng": rng_states,
                    })
                    final = str(finish_checkpoint(run_dir, step, keep=keep))

                failure = _attempt(write_rest, path, step)
            failure = self._agree(failure)
        if failure:
            if self.rank == 0:
                abandon_checkpoint(run_dir, step)
            raise CheckpointError(failure)
        return final

    def _agree(self, failure: str) -> str:
        """Every rank's failure text (or ""), exchanged: the first one, the same on every rank."""
        import torch.distributed as dist

        texts: list[Any] = [None] * self.world_size
        dist.all_gather_object(texts, failure)
        return next((t for t in texts if t), "")

    def _save_hf(self, out: Path, weights: dict[str, Any]) -> None:
        """The policy as a loadable HF folder, with the tokenizer files of the initial model."""
        self.engine.module.save_pretrained(str(out), state_dict=weights)
        for f in Path(self.model_path).iterdir():
            wanted = f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in _MODEL_CONFIG_FILES
            if wanted and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Resume exactly: weights, optimizer and lr-schedule state, step, policy version, RNG.

        `path` is a checkpoint folder or a run directory (its latest intact checkpoint). The files
        are checked against the checkpoint's manifest sizes (the driver checks sha256 once before:
        `learner.checkpoint.find_checkpoint`). Collective: call on every rank. Returns the saved
        `client_state`.
        """
        ckpt = Path(path)
        if not (ckpt / "state.json").is_file():
            found = latest_checkpoint(ckpt)
            if found is None:
                raise FileNotFoundError(f"{path}: no complete checkpoint (ckpt/step_*/COMPLETE) to resume from")
            ckpt = found
        problem = verify_checkpoint(ckpt)
        if problem:
            raise FileNotFoundError(f"{ckpt}: not a usable checkpoint: {problem}")
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

    # ---- weight publishing (broadcast transport; GPU not yet run) ------------------------------
    def connect_engines_nccl(self, engines: list) -> dict[str, Any]:
        """Rank 0 joins every engine's workers in one weight group (`rollout.weight_sync.NCCLWeightSender`).

        The sender lives on this rank's device: NCCL from `cuda:0` on GPU (engines started with
        `rollout.weight_transport=nccl`), the gloo stand-in on CPU (engines with `nccl_cpu`).
        """
        if self.rank != 0:
            return {}
        from rollout.weight_sync import NCCLWeightSender

        old = getattr(self, "_sender", None)
        if old is not None and hasattr(old, "close"):
            old.close()
        self._sender = None
        sender = NCCLWeightSender(engines, device=str(self.device))
        info = sender.connect()
        self._sender = sender
        return info

    def set_weight_sender(self, sender) -> None:
        """Publish through `sender` from now on (rank 0 keeps it; the other ranks only gather).

        Any object with `NCCLWeightSender`'s begin/send_bucket/end: `connect_engines_nccl` sets the
        real one; tests hand in one that records what it gets.
        """
        if self.rank == 0:
            self._sender = sender

    def publish_weights_stream(self) -> dict[str, Any]:
        """Send the current weights through the weight sender, labelled with the policy version.

        Straight from the parameters on this rank's device, in the engine's dtype (`model.dtype`;
        "auto": the parameters' own), bucket by bucket (`stream_weights`). Collective under ZeRO-3:
        call on every rank. Returns this rank's report (rank 0's holds the sender's timings).
        """
        module = self.engine.module
        dtype = wire_dtype(self.cfg.model.dtype, module)
        return stream_weights(module, getattr(self, "_sender", None), self.version, dtype,
                              rank=self.rank, zero3=self._zero3())


LearnerActor = ray.remote(LearnerWorker)


class LearnerGroup:
    """Driver-side handle on all learner ranks: every call goes to every rank, rank 0 answers."""

    def __init__(self, cfg, model_path: str | None = None, num_cpus_per_rank: float = 1,
                 num_gpus_per_rank: float | None = None, resources: dict[str, float] | None = None):
        cfg = _as_config(cfg)
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(cfg, resolve=True)
        self.world_size = int(cfg.learner.num_ranks)
        gpus = num_gpus_per_rank if num_gpus_per_rank is not None else (1 if cfg.cluster.learner_gpus > 0 else 0)
        self.actors = [
            LearnerActor.options(num_cpus=num_cpus_per_rank, num_gpus=gpus, resources=dict(resources or {})).remote(
                plain, rank, self.world_size, model_path
            )
            for rank in range(self.world_size)
        ]
        addr = ray.get(self.actors[0].node_address.remote())
        port = ray.get(self.actors[0].free_port.remote())
        self.setup_info = ray.get([a.setup.remote(addr, port) for a in self.actors])

    def _all(self, method: str, *args, **kwargs) -> list:
        """Call `method` on every rank; results in rank order. Fails at the FIRST rank that fails:
        `ray.get` of the whole list would wait on rank 0 first, which may sit in a collective with a
        dead rank until the process-group timeout (30 minutes) instead of reporting it."""
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])  # raises the rank's error (RayActorError for a dead rank) at once
        return ray.get(refs)

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
        """Broadcast transport: rank 0 joins the engines' weight group (once, before training)."""
        return self._all("connect_engines_nccl", engines)[0]

    def set_weight_sender(self, sender) -> None:
        """Rank 0 publishes through `sender` (see `LearnerWorker.set_weight_sender`)."""
        ray.get(self.actors[0].set_weight_sender.remote(sender))

    def publish_weights_stream(self) -> list[dict[str, Any]]:
        """Every rank streams the weights (ZeRO-3: gathers bucket by bucket); their reports, by rank."""
        return self._all("publish_weights_stream")

    def publish_weights_nccl(self, engines: list) -> int:
        """GPU weight sync to the engines joined by `connect_engines_nccl`; returns the published version."""
        self.publish_weights_stream()
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
