"""Weight sync from the learner to the vLLM engines: one contract, two transports.

Contract (both transports): the engine actor's `update_weights(payload, version)` pauses generation,
loads the new weights, resets the prefix cache (stale KV blocks would otherwise be reused,
cpu-stack.md 4.5), sets the policy version and resumes. Weights are named as in the Hugging Face
checkpoint (`model.layers.0.self_attn.q_proj.weight`, ...): vLLM's loader fuses q/k/v and gate/up
and shards for tensor parallelism itself.

- "object_store" (CPU, or any machine without NCCL between learner and engine): the learner returns
  `export_state_dict(model)`; Ray puts it in the object store; the driver passes the ObjectRef
  **wrapped in a list** (so Ray does not resolve it on the way) as the payload; the engine actor
  awaits it, validates it against the checkpoint, and calls `apply_cpu_weights` (safetensors bytes
  through `collective_rpc` into `rollout.worker_ext.WeightSyncExtension`).
- "nccl" (GPU): vLLM 0.32's native weight transfer with the `nccl` backend (gpu-weight-sync.md).
  One NCCL group joins the learner's rank 0 (NCCL rank 0) with every worker of every engine; each
  engine gets its own `rank_offset`. The learner's `NCCLWeightSender.send` submits
  `update_weights(payload=<per-bucket metadata>, version)` to every engine actor and broadcasts the
  same buckets in the same order; the engine side runs `apply_nccl_weights`.
  **Written without a GPU: not yet run.**

`resolve_transport("auto")` picks nccl when CUDA is available, else object_store.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRANSPORTS = ("auto", "object_store", "nccl")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class WeightSyncError(ValueError):
    """Weights that cannot be loaded into the engine (wrong names, shapes, dtypes, non-finite values)."""


def resolve_transport(name: str, cuda_available: bool | None = None) -> str:
    """"auto" -> "nccl" with CUDA else "object_store"; explicit names are checked and returned."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.weight_transport={name!r}: choose one of {', '.join(TRANSPORTS)}")
    if name != "auto":
        return name
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "nccl" if cuda_available else "object_store"


def hf_name(name: str) -> str:
    """Strip wrapper prefixes (DeepSpeed/DDP `module.`, torch.compile, activation checkpointing)."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
        name = name.replace("._checkpoint_wrapped_module.", ".")
    return name


def is_tied(model) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


# ---- learner side (object store) --------------------------------------------------------------
def export_state_dict(model, dtype=None) -> dict[str, Any]:
    """The learner's weights as an HF-named CPU state dict (detached, contiguous copies).

    `model` is the plain Hugging Face module (e.g. `ds_engine.module`) with full parameters (ZeRO
    0-2; a ZeRO-3 module must be gathered first). The LM head is left out when it is tied to the
    embedding (vLLM loads the embedding and ignores `lm_head.*` then). `dtype` (e.g. torch.bfloat16)
    halves the bytes for a bf16 engine; None keeps the parameters' dtype.
    """
    tied = is_tied(model)
    out: dict[str, Any] = {}
    for raw, tensor in model.state_dict().items():
        name = hf_name(raw)
        if tied and name.startswith("lm_head."):
            continue
        if name in out:
            raise WeightSyncError(f"export_state_dict: two parameters map to {name!r}")
        if tensor.numel() == 0:
            raise WeightSyncError(f"export_state_dict: {raw!r} is empty (a ZeRO-3 partition? gather first)")
        t = tensor.detach()
        out[name] = t.to(device="cpu", dtype=dtype or t.dtype, copy=True).contiguous()
    return out


# ---- engine side (object store) ---------------------------------------------------------------
def checkpoint_specs(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{name: (shape, dtype)}` of every tensor in a Hugging Face folder's safetensors files (headers only)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise WeightSyncError(f"{model_dir}: no *.safetensors files")
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = st.get_slice(k)
                specs[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return specs


def checkpoint_is_tied(model_dir: str | Path) -> bool:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text_cfg = cfg.get("text_config") or {}
    return bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))


def check_state_dict(state: dict[str, Any], expected: dict[str, tuple[tuple[int, ...], str]],
                     tied: bool) -> dict[str, Any]:
    """Validate a full HF-named state dict against the served checkpoint; returns the tensors to send.

    A tied `lm_head.*` is dropped. Every checkpoint tensor must be present with the same shape, a
    floating dtype and finite values; nothing else may be present. Raises `WeightSyncError` naming
    the first bad tensor: the engine must never start a reload it cannot finish.
    """
    import torch

    if not isinstance(state, dict) or not state:
        raise WeightSyncError(f"weights must be a non-empty dict of tensors, got {type(state).__name__}")
    want = {k: v for k, v in expected.items() if not (tied and k.startswith("lm_head."))}
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        if tied and name.startswith("lm_head."):
            continue
        if name not in want:
            raise WeightSyncError(f"unexpected tensor {name!r}: the checkpoint has no such weight")
        if not isinstance(tensor, torch.Tensor):
            raise WeightSyncError(f"{name!r}: expected a tensor, got {type(tensor).__name__}")
        shape = tuple(tensor.shape)
        if shape != tuple(want[name][0]):
            raise WeightSyncError(f"{name!r}: shape {shape} != checkpoint shape {tuple(want[name][0])}")
        if not tensor.is_floating_point():
            raise WeightSyncError(f"{name!r}: dtype {tensor.dtype} is not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise WeightSyncError(f"{name!r}: contains NaN or inf")
        out[name] = tensor.detach().cpu().contiguous()
    missing = sorted(set(want) - set(out))
    if missing:
        raise WeightSyncError(f"missing {len(missing)} tensors, e.g. {missing[:3]} (a full state dict is required)")
    return out


def encode_state_dict(state: dict[str, Any]) -> bytes:
    """safetensors bytes (tensors cannot be passed through `collective_rpc`, bytes can)."""
    from safetensors.torch import save

    return save(state)


async def apply_cpu_weights(engine, state: dict[str, Any]) -> dict[str, float]:
    """Engine side of the object-store transport: send `state` (already checked) to every worker.

    `engine` is a vLLM AsyncLLM started with `worker_extension_cls="rollout.worker_ext.WeightSyncExtension"`.
    Generation must be paused by the caller; the caller also resets the prefix cache afterwards.
    """
    t0 = time.perf_counter()
    blob = encode_state_dict(state)
    t1 = time.perf_counter()
    results = await engine.collective_rpc("finemem_reload_safetensors", args=(blob,))
    t2 = time.perf_counter()
    first = results[0] if isinstance(results, list) and results else {}
    return {"serialize_s": t1 - t0, "rpc_s": t2 - t1, "bytes": float(len(blob)),
            "tensors": float(first.get("tensors", 0)), "worker_reload_s": float(first.get("reload_s", 0.0))}


# ---- NCCL transport (GPU) ---------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One tensor on the wire: its HF name, torch dtype name ("bfloat16") and full shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype_name: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def module_param_specs(model, wire_dtype: str | None = None) -> list[ParamSpec]:
    """The wire metadata of a module's parameters, in `named_parameters()` order.

    Uses `ds_shape` for ZeRO-3 partitioned parameters (their `.shape` is `(0,)`), strips wrapper
    prefixes, and skips a tied LM head (named_parameters already de-duplicates it; the check also
    covers untied-by-name exports).
    """
    tied = is_tied(model)
    specs = []
    for raw, p in model.named_parameters():
        name = hf_name(raw)
        if tied and name.startswith("lm_head."):
            continue
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        dtype = wire_dtype or str(p.dtype).split(".")[-1]
        specs.append(ParamSpec(name, dtype, tuple(int(d) for d in shape)))
    return specs


def plan_buckets(specs: list[ParamSpec], bucket_bytes: int) -> list[list[ParamSpec]]:
    """Cut `specs` into contiguous buckets of at most `bucket_bytes` (a bigger tensor is a bucket alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[ParamSpec]] = []
    current: list[ParamSpec] = []
    size = 0
    for s in specs:
        if current and size + s.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current:
        buckets.append(current)
    return buckets


def bucket_update_info(bucket: list[ParamSpec]) -> dict[str, list]:
    """vLLM 0.32 `NCCLWeightTransferUpdateInfo` fields of one bucket (no `packed` key: that is init-only)."""
    return {"names": [s.name for s in bucket], "dtype_names": [s.dtype for s in bucket],
            "shapes": [list(s.shape) for s in bucket]}


def nccl_init_payloads(world_sizes: list[int], master_address: str, master_port: int, *,
                       packed_buffer_size_bytes: int, packed_num_buffers: int) -> list[dict[str, Any]]:
    """Per-engine `init_weight_transfer_engine` payloads: the trainer is rank 0, engine i starts at
    `1 + sum(world_sizes[:i])` (vLLM's own trainer gives every engine offset 1, which collides)."""
    if not world_sizes or any(w < 1 for w in world_sizes):
        raise ValueError(f"engine world sizes must be positive, got {world_sizes}")
    world = 1 + sum(world_sizes)
    payloads, offset = [], 1
    for w in world_sizes:
        payloads.append({"master_address": master_address, "master_port": int(master_port),
                         "rank_offset": offset, "world_size": world, "packed": True,
                         "packed_buffer_size_bytes": int(packed_buffer_size_bytes),
                         "packed_num_buffers": int(packed_num_buffers)})
        offset += w
    return payloads


async def apply_nccl_weights(engine, update_infos: list[dict[str, list]], version: int) -> dict[str, float]:
    """Engine side of the NCCL transport: start, receive every bucket (the learner broadcasts them
    concurrently, same order), finish with the version label. Generation must be paused by the caller.

    A failure in here leaves the layer-wise reload half done (or a worker blocked in NCCL): the
    caller must not resume generation; the engine has to be restarted.
    """
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    t0 = time.perf_counter()
    await engine.start_weight_update()
    for info in update_infos:
        await engine.update_weights(WeightTransferUpdateRequest(update_info=info))
    t1 = time.perf_counter()
    await engine.finish_weight_update(weight_version=str(version))
    t2 = time.perf_counter()
    return {"receive_s": t1 - t0, "finish_s": t2 - t1, "buckets": float(len(update_infos))}


def free_port(address: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class NCCLWeightSender:
    """Learner rank 0's end of the NCCL transport (GPU; **not yet run on a GPU**).

    Usage (ZeRO 0-2: only rank 0 does this; the other ranks wait at a barrier):
        sender = NCCLWeightSender(engine_handles)      # EngineActor handles, started with transport nccl
        sender.connect()                               # once; joins every engine worker in one NCCL group
        specs = module_param_specs(ds_engine.module, "bfloat16")
        sender.send(specs, named_tensors(ds_engine.module), version=step)
    `tensors` must yield `(name, tensor)` in exactly the order and with the names/shapes of `specs`;
    each tensor is cast to the spec's dtype, moved to the current CUDA device and made contiguous
    here. For ZeRO-3 the iterator may gather lazily: it runs on this (the caller's) thread, bucket
    by bucket, on the default stream, and each bucket is fully materialized (and synchronized)
    before its broadcast starts (the TRL #6798 deadlock pattern is avoided); yield clones.

    The broadcast of each bucket runs on a daemon thread while this thread watches the engines'
    `update_weights` calls: if an engine fails first, `send` raises instead of hanging in NCCL.
    After any failure the group is unusable: restart the engines and build a new sender (new port).
    """

    def __init__(self, engines: list, *, master_address: str | None = None, master_port: int | None = None,
                 packed_buffer_size_bytes: int = 256 * 1024 * 1024, packed_num_buffers: int = 2,
                 bucket_bytes: int = 1024 * 1024 * 1024, timeout_s: float = 600.0):
        if not engines:
            raise ValueError("NCCLWeightSender needs at least one engine actor")
        self.engines = list(engines)
        self.master_address = master_address
        self.master_port = master_port
        self.packed_buffer_size_bytes = int(packed_buffer_size_bytes)
        self.packed_num_buffers = int(packed_num_buffers)
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = float(timeout_s)
        self.group = None
        self.device = None
        self.broken: str | None = None

    def connect(self) -> dict[str, Any]:
        """Open the NCCL group: every engine's workers and this process (rank 0) join concurrently."""
        import ray
        import torch
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        t0 = time.perf_counter()
        self.device = torch.cuda.current_device()
        torch.cuda.set_device(self.device)  # PyNccl uses the current device
        address = self.master_address or ray.util.get_node_ip_address()
        port = self.master_port or free_port()
        sizes = ray.get([e.world_size.remote() for e in self.engines], timeout=self.timeout_s)
        payloads = nccl_init_payloads(sizes, address, port, packed_buffer_size_bytes=self.packed_buffer_size_bytes,
                                      packed_num_buffers=self.packed_num_buffers)
        # The workers block in init until all ranks join: submit theirs first, then open ours.
        refs = [e.init_weight_receiver.remote(p) for e, p in zip(self.engines, payloads)]
        try:
            self.group = trainer_init({"master_address": address, "master_port": port,
                                       "world_size": payloads[0]["world_size"]}, rank=0)
            ray.get(refs, timeout=self.timeout_s)
        except Exception as e:
            self.broken = f"connect failed: {e!r}"
            raise
        return {"connect_s": time.perf_counter() - t0, "world_size": float(payloads[0]["world_size"])}

    def _broadcast_async(self, pairs: list) -> tuple[threading.Thread, list]:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        error: list = []

        def run():
            import torch

            try:
                torch.cuda.set_device(self.device)  # the current device is per thread
                packed_nccl_broadcast_producer(iter(pairs), self.group, src=0, post_iter_func=lambda x: x[1],
                                               buffer_size_bytes=self.packed_buffer_size_bytes,
                                               num_buffers=self.packed_num_buffers)
            except BaseException as e:  # noqa: BLE001 (re-raised by the watcher on the caller's thread)
                error.append(e)

        thread = threading.Thread(target=run, name="nccl-weight-broadcast", daemon=True)
        thread.start()
        return thread, error

    def _watch(self, thread: threading.Thread, error: list, refs: list, deadline: float) -> None:
        """Wait for one bucket's broadcast; fail fast if an engine call fails or time runs out."""
        import ray

        while thread.is_alive():
            thread.join(timeout=0.5)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                ray.get(ref)  # raises the engine's error (an engine cannot finish before our broadcast)
            if time.monotonic() > deadline:
                raise TimeoutError("NCCL weight broadcast did not finish in time")
        if error:
            raise error[0]

    def send(self, specs: list[ParamSpec], tensors: Iterable[tuple[str, Any]], version: int) -> dict[str, float]:
        """Push one full set of weights to every engine and set their policy version; returns timings."""
        import ray
        import torch

        if self.group is None:
            raise RuntimeError("NCCLWeightSender.send before connect()")
        if self.broken:
            raise RuntimeError(f"NCCL weight group is unusable ({self.broken}); restart engines and reconnect")
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        buckets = plan_buckets(specs, self.bucket_bytes)
        infos = [bucket_update_info(b) for b in buckets]
        refs = [e.update_weights.remote(infos, version) for e in self.engines]
        it: Iterator = iter(tensors)
        try:
            for bucket in buckets:
                pairs = []
                for spec in bucket:
                    try:
                        name, tensor = next(it)
                    except StopIteration:
                        raise WeightSyncError(f"tensors ended before {spec.name!r}") from None
                    if name != spec.name or tuple(tensor.shape) != spec.shape:
                        raise WeightSyncError(f"tensor {name!r} {tuple(tensor.shape)} does not match spec "
                                              f"{spec.name!r} {spec.shape}")
                    t = tensor.detach().to(device=f"cuda:{self.device}", dtype=getattr(torch, spec.dtype))
                    pairs.append((name, t.contiguous()))
                torch.cuda.current_stream().synchronize()  # gathers/casts complete before another stream reads
                thread, error = self._broadcast_async(pairs)
                self._watch(thread, error, refs, deadline)
            if next(it, None) is not None:
                raise WeightSyncError("tensors yielded more entries than specs")
            t1 = time.perf_counter()
            results = ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))
        except BaseException as e:
            self.broken = repr(e)
            raise
        t2 = time.perf_counter()
        out = {"broadcast_s": t1 - t0, "engine_wait_s": t2 - t1, "total_s": t2 - t0,
               "bytes": float(sum(s.nbytes for s in specs)), "buckets": float(len(buckets))}
        for key in ("pause_s", "load_s", "reset_s"):
            out[f"engine_max_{key}"] = max(float(r.get(key, 0.0)) for r in results)
        return out

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.destroy()
            except Exception as e:  # noqa: BLE001 (a broken group may fail to tear down; nothing to do)
                warnings.warn(f"NCCL weight group teardown failed: {e!r}", stacklevel=2)
            self.group = None
