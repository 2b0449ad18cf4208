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
  engine gets its own `rank_offset`. The learner's `NCCLWeightSender.begin` submits
  `update_weights(payload=<per-bucket metadata>, version)` to every engine actor, then
  `send_bucket` broadcasts the same buckets in the same order; the engine side runs
  `apply_nccl_weights`. **Not yet run on a GPU.**
- "nccl_cpu": the same protocol, sender and engine code with only the device ("cpu") and the
  group (a private gloo group) swapped: `rollout.cpu_group_transfer`. It is how the NCCL
  protocol is tested without GPUs.

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

from finemem.placement import CPU_BACKEND, TRANSPORTS  # the names live in the core: placement checks them

# Transports that use vLLM's weight-transfer API: transport -> vLLM backend name.
BROADCAST_BACKENDS = {"nccl": "nccl", CPU_BACKEND: CPU_BACKEND}
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


def check_packed_alignment(bucket: list[ParamSpec], buffer_size_bytes: int) -> None:
    """Raise `WeightSyncError` if the packed layout would misalign a tensor of `bucket`.

    The receiver cuts the bucket into chunks exactly as `pack_tensors` does (a chunk closes once its
    bytes exceed the buffer) and views each tensor's bytes as its dtype in place (vLLM's
    `unpack_tensor`), which fails unless the tensor starts at a multiple of its element size. One
    wire dtype always aligns; mixed dtypes may not, and a failure there would kill the engines
    halfway through a reload, so it is refused before anything is sent.
    """
    offset = 0
    for s in bucket:
        size = _itemsize(s.dtype)
        if offset % size:
            raise WeightSyncError(f"{s.name!r} ({s.dtype}) would start at byte {offset} of a packed chunk, "
                                  f"not a multiple of {size}: send every tensor in one wire dtype "
                                  "(module_param_specs(model, wire_dtype))")
        offset += s.nbytes
        if offset > buffer_size_bytes:
            offset = 0


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


def pynccl_group(master_address: str, master_port: int, world_size: int, rank: int = 0):
    """`NCCLWeightSender` group factory for CUDA: vLLM's StatelessProcessGroup + PyNccl on the current device."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": master_address, "master_port": int(master_port),
                         "world_size": int(world_size)}, rank=rank)


def cpu_group(master_address: str, master_port: int, world_size: int, rank: int = 0):
    """`NCCLWeightSender` group factory for device "cpu": the gloo stand-in (`rollout.cpu_group_transfer`)."""
    from rollout.cpu_group_transfer import gloo_group

    return gloo_group(master_address, master_port, world_size, rank)


@dataclass
class _Round:
    """One weight push in progress (between `begin` and `end`)."""

    buckets: list[list[ParamSpec]]
    refs: list
    version: int
    deadline: float
    started: float
    sent: int = 0
    broadcast_s: float = 0.0


class NCCLWeightSender:
    """Learner rank 0's end of the broadcast weight transport (nccl on GPU, nccl_cpu on CPU).

    `device` is where the wire tensors live ("cuda", "cuda:N" or "cpu"); `group_factory(master_address,
    master_port, world_size, rank=0)` opens the sender's end of the group. The defaults follow the device:
    PyNccl for CUDA (`pynccl_group`), the gloo stand-in for CPU (`cpu_group`). Nothing else differs.

    ZeRO 0-2 (full parameters on rank 0; only rank 0 does this, the other ranks wait at a barrier):
        sender = NCCLWeightSender(engine_handles)      # EngineActor handles (transport nccl / nccl_cpu)
        sender.connect()                               # once; joins every engine worker in one group
        specs = module_param_specs(ds_engine.module, "bfloat16")
        sender.send(specs, ((s.name, full_tensor_of(s.name)) for s in specs), version=step)
    ZeRO-3: gathering is a collective, so ALL ranks gather each bucket together, and only rank 0 sends:
        buckets = sender.begin(specs, step)            # rank 0; broadcast the bucket plan to the other ranks
        for bucket in buckets:                         # every rank
            with deepspeed.zero.GatheredParameters(params_of(bucket), modifier_rank=None):
                if rank == 0:
                    sender.send_bucket([(s.name, full_tensor_of(s.name)) for s in bucket])
        sender.end()                                   # rank 0
    Never hand `send` an iterator that gathers lazily under ZeRO-3: only rank 0 iterates it, so the
    other ranks never join the gather and every rank hangs.

    `send_bucket` takes the bucket's `(name, tensor)` pairs in plan order, ideally already on the sender's
    device in the wire dtype: a tensor is cast or moved only when it is not (one `.to`, never through
    the host); it is not cloned, so keep it unchanged until `send_bucket` returns.

    Each bucket's broadcast runs on a daemon thread while this thread watches the engines'
    `update_weights` calls: if an engine fails first, the call raises instead of hanging in the
    collective. After any failure (including a bucket that does not match the plan) the group is
    unusable: every later call raises; restart the engines and build a new sender (new port).
    """

    def __init__(self, engines: list, *, device: str | None = None, group_factory=None,
                 master_address: str | None = None, master_port: int | None = None,
                 packed_buffer_size_bytes: int = 256 * 1024 * 1024, packed_num_buffers: int = 2,
                 bucket_bytes: int = 1024 * 1024 * 1024, timeout_s: float = 600.0):
        if not engines:
            raise ValueError("NCCLWeightSender needs at least one engine actor")
        self.engines = list(engines)
        self.device_name = device or "cuda"
        if self.device_name.split(":")[0] not in ("cuda", "cpu"):
            raise ValueError(f"NCCLWeightSender device {device!r}: use 'cuda', 'cuda:N' or 'cpu'")
        on_cpu = self.device_name == "cpu"
        self.group_factory = group_factory or (cpu_group if on_cpu else pynccl_group)
        self.master_address = master_address
        self.master_port = master_port
        self.packed_buffer_size_bytes = int(packed_buffer_size_bytes)
        self.packed_num_buffers = int(packed_num_buffers)
        self.bucket_bytes = int(bucket_bytes)
        self.timeout_s = float(timeout_s)
        self.group = None
        self.device = None  # torch.device, set by connect()
        self.broken: str | None = None
        self._round: _Round | None = None

    # ---- state checks -------------------------------------------------------------------------
    def _check_usable(self, what: str) -> None:
        if self.broken:
            raise RuntimeError(f"NCCLWeightSender.{what}: the weight group is unusable after a failure "
                               f"({self.broken}); restart the engines and build a new sender (new port)")
        if self.group is None:
            raise RuntimeError(f"NCCLWeightSender.{what} before connect()")

    def _fail(self, error: BaseException) -> None:
        """Record the first failure: the group is now unusable (a peer may be stuck in a collective)."""
        if not self.broken:
            self.broken = repr(error)

    def _active_round(self, what: str) -> _Round:
        self._check_usable(what)
        if self._round is None:
            raise RuntimeError(f"NCCLWeightSender.{what} without begin()")
        return self._round

    def _run_watched(self, fn, refs: list, deadline: float, what: str):
        """Run `fn` on a daemon thread; raise an engine call's error, or a timeout, as soon as it happens."""
        import ray

        result, error = [], []

        def run():
            try:
                if self.device.type == "cuda":
                    import torch

                    torch.cuda.set_device(self.device)  # the current device is per thread
                result.append(fn())
            except BaseException as e:  # noqa: BLE001 (re-raised below, on the caller's thread)
                error.append(e)

        thread = threading.Thread(target=run, name="finemem-weight-group", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                ray.get(ref)  # raises an engine's error
            if thread.is_alive() and time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish within {self.timeout_s:.0f}s")
        if error:
            raise error[0]
        return result[0]

    # ---- protocol -----------------------------------------------------------------------------
    def connect(self) -> dict[str, Any]:
        """Open the group: every engine's workers and this process (rank 0) join concurrently."""
        import ray
        import torch

        if self.group is not None or self.broken:
            raise RuntimeError("NCCLWeightSender.connect: already connected (or failed); build a new sender")
        t0 = time.perf_counter()
        device = torch.device(self.device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        address = self.master_address or ray.util.get_node_ip_address()
        port = self.master_port or free_port()
        try:
            sizes = ray.get([e.world_size.remote() for e in self.engines], timeout=self.timeout_s)
            payloads = nccl_init_payloads(sizes, address, port,
                                          packed_buffer_size_bytes=self.packed_buffer_size_bytes,
                                          packed_num_buffers=self.packed_num_buffers)
            world = payloads[0]["world_size"]
            # The workers block in init until all ranks join: submit theirs first, then open ours.
            refs = [e.init_weight_receiver.remote(p) for e, p in zip(self.engines, payloads)]
            self.group = self._run_watched(lambda: self.group_factory(address, port, world, rank=0), refs,
                                           time.monotonic() + self.timeout_s, "opening the weight group")
            ray.get(refs, timeout=self.timeout_s)
        except BaseException as e:
            self._fail(e)
            raise
        return {"connect_s": time.perf_counter() - t0, "world_size": float(world)}

    def begin(self, specs: list[ParamSpec], version: int) -> list[list[ParamSpec]]:
        """Plan the buckets and submit every engine's `update_weights(infos, version)`; returns the buckets.

        Send each returned bucket with `send_bucket`, in order, then call `end`.
        """
        self._check_usable("begin")
        if self._round is not None:
            raise RuntimeError("NCCLWeightSender.begin: the previous push was not ended (call end())")
        names = [s.name for s in specs]
        if not names:
            raise WeightSyncError("NCCLWeightSender.begin: no parameters to send")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise WeightSyncError(f"NCCLWeightSender.begin: parameter {dup!r} appears twice in specs")
        buckets = plan_buckets(list(specs), self.bucket_bytes)
        for bucket in buckets:
            check_packed_alignment(bucket, self.packed_buffer_size_bytes)
        infos = [bucket_update_info(b) for b in buckets]
        started = time.perf_counter()
        try:
            refs = [e.update_weights.remote(infos, int(version)) for e in self.engines]
        except BaseException as e:
            self._fail(e)
            raise
        self._round = _Round(buckets=buckets, refs=refs, version=int(version), started=started,
                             deadline=time.monotonic() + self.timeout_s)
        return buckets

    def _wire_pairs(self, index: int, bucket: list[ParamSpec], pairs: list) -> list:
        import torch

        if len(pairs) != len(bucket):
            raise WeightSyncError(f"bucket {index} was planned with {len(bucket)} tensors "
                                  f"({bucket[0].name!r} .. {bucket[-1].name!r}), got {len(pairs)}")
        out = []
        for spec, pair in zip(bucket, pairs):
            name, tensor = pair
            if name != spec.name:
                raise WeightSyncError(f"bucket {index}: got {name!r} where {spec.name!r} was planned "
                                      "(send the tensors in the order of the specs given to begin)")
            if not isinstance(tensor, torch.Tensor):
                raise WeightSyncError(f"{name!r}: expected a tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != spec.shape:
                raise WeightSyncError(f"{name!r}: shape {tuple(tensor.shape)} != planned {spec.shape} "
                                      "(a ZeRO-3 partition? gather the bucket first)")
            t = tensor.detach()
            dtype = getattr(torch, spec.dtype)
            if t.device != self.device or t.dtype != dtype:
                t = t.to(device=self.device, dtype=dtype)
            out.append((name, t))
        return out

    def _produce(self, pairs: list) -> None:
        """The packed broadcast of one bucket (vLLM's producer on CUDA, its stream-free twin on CPU)."""
        if self.device.type == "cuda":
            from vllm.distributed.weight_transfer.packed_tensor import (
                packed_nccl_broadcast_producer as producer,
            )
        else:
            from rollout.cpu_group_transfer import packed_broadcast_producer as producer
        producer(iter(pairs), self.group, src=0, post_iter_func=lambda x: x[1],
                 buffer_size_bytes=self.packed_buffer_size_bytes, num_buffers=self.packed_num_buffers)

    def send_bucket(self, pairs: list[tuple[str, Any]]) -> None:
        """Broadcast the next planned bucket: `pairs` are its `(name, full tensor)` in plan order."""
        r = self._active_round("send_bucket")
        index = r.sent
        try:
            if index >= len(r.buckets):
                raise WeightSyncError(f"send_bucket: all {len(r.buckets)} planned buckets were sent; call end()")
            wire = self._wire_pairs(index, r.buckets[index], list(pairs))
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                import torch

                torch.cuda.current_stream(self.device).synchronize()  # gathers/casts done before another stream reads
            self._run_watched(lambda: self._produce(wire), r.refs, r.deadline,
                              f"broadcast of bucket {index}/{len(r.buckets)}")
            r.broadcast_s += time.perf_counter() - t0
        except BaseException as e:
            self._fail(e)
            raise
        r.sent += 1

    def end(self) -> dict[str, float]:
        """Wait for every engine to finish loading (and to take the version); returns timings."""
        import ray

        r = self._active_round("end")
        t1 = time.perf_counter()
        try:
            if r.sent != len(r.buckets):
                raise WeightSyncError(f"end() after {r.sent} of {len(r.buckets)} planned buckets: "
                                      "send every bucket begin() returned")
            results = ray.get(r.refs, timeout=max(1.0, r.deadline - time.monotonic()))
        except BaseException as e:
            self._fail(e)
            raise
        self._round = None
        t2 = time.perf_counter()
        specs = [s for b in r.buckets for s in b]
        out = {"broadcast_s": r.broadcast_s, "engine_wait_s": t2 - t1, "total_s": t2 - r.started,
               "bytes": float(sum(s.nbytes for s in specs)), "buckets": float(len(r.buckets))}
        for key in ("pause_s", "load_s", "reset_s"):
            out[f"engine_max_{key}"] = max(float(res.get(key, 0.0)) for res in results)
        return out

    def send(self, specs: list[ParamSpec], tensors: Iterable[tuple[str, Any]], version: int) -> dict[str, float]:
        """begin + send_bucket per bucket + end, from `(name, tensor)` pairs in the order of `specs`.

        Rank 0 only, with full parameters (ZeRO 0-2): see the class doc for ZeRO-3.
        """
        buckets = self.begin(specs, version)
        it: Iterator = iter(tensors)
        try:
            for bucket in buckets:
                pairs = []
                for spec in bucket:
                    item = next(it, None)
                    if item is None:
                        raise WeightSyncError(f"tensors ended before {spec.name!r}")
                    pairs.append(item)
                self.send_bucket(pairs)
            if next(it, None) is not None:
                raise WeightSyncError(f"tensors yielded more entries than the {len(specs)} specs")
        except BaseException as e:
            self._fail(e)
            raise
        return self.end()

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.destroy()
            except Exception as e:  # noqa: BLE001 (a broken group may fail to tear down; nothing to do)
                warnings.warn(f"weight group teardown failed: {e!r}", stacklevel=2)
            self.group = None
