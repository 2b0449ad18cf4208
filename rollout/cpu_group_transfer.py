"""CPU stand-in for the NCCL weight transfer: the same protocol with gloo in place of NCCL.

Why: the NCCL path (learner rank 0 -> every engine worker, `rollout.weight_sync.NCCLWeightSender`)
can only run on GPUs, and NCCL cannot put two ranks on one GPU. This module swaps exactly two
things so that the rest of the protocol runs, and is tested, on CPU:

- the group: `GlooBroadcastGroup` offers the two calls the packed protocol needs from vLLM's
  `PyNcclCommunicator` (`broadcast(tensor, src)` in place, `destroy()`), over a private
  `ProcessGroupGloo` built from its own TCPStore. It never touches `torch.distributed`'s default
  group (the vLLM worker already has its own world there). vLLM's `StatelessProcessGroup` is not
  usable here: its `broadcast` pickles through the store and returns a new tensor instead of
  filling the receive buffer;
- the device: vLLM's packed producer/consumer rotate CUDA streams, which do not exist on CPU.
  `packed_broadcast_producer` / `packed_broadcast_consumer` below are the same loops without the
  streams. They cut chunks with vLLM's own `pack_tensors` rule (a chunk closes once its bytes
  exceed the buffer size; a bigger tensor is a chunk alone) and unpack with vLLM's
  `unpack_tensor`, so the bytes on the wire are laid out as in the nccl backend.

The engine side is `CPUBroadcastWeightTransferEngine`, a subclass of vLLM's
`NCCLWeightTransferEngine` registered as the weight-transfer backend `nccl_cpu` by
`rollout.worker_ext` (imported in every vLLM worker before the model loads). It takes the same init
info and update info as `nccl`, and computes the worker's rank the same way. It differs in four
places. It builds the gloo group. It receives into CPU buffers. It skips the base class's
`torch.accelerator.synchronize()`, which raises without an accelerator (gloo is synchronous anyway).
After the layer-wise reload it re-packs a tied LM head (cpu-stack.md 4.4). Select it with
`rollout.weight_transport=nccl_cpu`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

from rollout.weight_sync import CPU_BACKEND

DEFAULT_TIMEOUT_S = 600.0
_STORE_PREFIX = "finemem/weights"


class GlooBroadcastGroup:
    """A private gloo process group of `world_size` ranks with a PyNccl-shaped `broadcast`.

    Rank 0 hosts the TCPStore at `master_address:master_port` (as in vLLM's
    `StatelessProcessGroup.create`); the constructor returns once all ranks have joined.
    """

    def __init__(self, master_address: str, master_port: int, world_size: int, rank: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the weight group of size {world_size}")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size = int(rank), int(world_size)
        self._store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0,
                                    timeout=timeout, wait_for_workers=False)
        self._pg = dist.ProcessGroupGloo(dist.PrefixStore(_STORE_PREFIX, self._store), self.rank, self.world_size,
                                         timeout)

    def broadcast(self, tensor, src: int, stream: Any = None) -> None:
        """Fill `tensor` on every rank with rank `src`'s copy (blocks until done; `stream` is ignored)."""
        if self._pg is None:
            raise RuntimeError("weight group was destroyed")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = int(src), 0
        self._pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        self._pg = None
        self._store = None


def gloo_group(master_address: str, master_port: int, world_size: int, rank: int = 0) -> GlooBroadcastGroup:
    """`NCCLWeightSender` group factory for device "cpu" (the sender is rank 0)."""
    return GlooBroadcastGroup(master_address, master_port, world_size, rank)


def packed_broadcast_producer(iterator: Iterator[tuple[str, Any]], group, src: int,
                              post_iter_func: Callable[[tuple[str, Any]], Any], buffer_size_bytes: int,
                              num_buffers: int = 1) -> None:
    """vLLM's `packed_nccl_broadcast_producer` without CUDA streams (`num_buffers` only matters there)."""
    while (chunk := pack_tensors(iterator, post_iter_func, buffer_size_bytes)) is not None:
        group.broadcast(chunk.packed_tensor, src=src)


def packed_broadcast_consumer(iterator: Iterator[tuple[str, tuple[list[int], Any]]], group, src: int,
                              post_unpack_func: Callable[[list[tuple[str, Any]]], Any], buffer_size_bytes: int,
                              device: Any = "cpu") -> None:
    """vLLM's `packed_nccl_broadcast_consumer` without CUDA streams: same chunk boundaries, rebuilt
    from the metadata alone. Every chunk gets a fresh buffer, because the unpacked tensors are views
    that the layer-wise reload may keep until its layer is complete."""
    meta: list[tuple[str, list[int], Any, int]] = []

    def flush() -> None:
        size = sum(m[3] for m in meta)
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
        group.broadcast(buffer, src=src)
        names, shapes, dtypes, sizes = (list(x) for x in zip(*meta))
        post_unpack_func(unpack_tensor(buffer, names, shapes, dtypes, sizes))
        meta.clear()

    total = 0
    for name, (shape, dtype) in iterator:
        nbytes = math.prod(shape) * dtype.itemsize
        meta.append((name, list(shape), dtype, nbytes))
        total += nbytes
        if total > buffer_size_bytes:
            flush()
            total = 0
    if meta:
        flush()


class CPUBroadcastWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's dense NCCL engine with the gloo group and CPU receive buffers (see the module doc)."""

    def init_transfer_engine(self, init_info) -> None:
        if not init_info.packed:
            raise ValueError(f"weight backend {CPU_BACKEND} implements the packed layout only (send packed=True)")
        if init_info.master_address is None or init_info.master_port is None:
            raise ValueError(f"weight backend {CPU_BACKEND} needs master_address and master_port "
                             "(nccl_unique_id_b64 is NCCL-only)")
        self.packed = True
        self.packed_buffer_size_bytes = int(init_info.packed_buffer_size_bytes)
        self.packed_num_buffers = int(init_info.packed_num_buffers)
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset  # as in nccl_common
        self.model_update_group = GlooBroadcastGroup(init_info.master_address, init_info.master_port,
                                                     init_info.world_size, rank)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        if self.model_update_group is None:
            raise RuntimeError(f"weight backend {CPU_BACKEND}: init_weight_transfer_engine was not called")
        metadata = ((name, (shape, getattr(torch, dtype)))
                    for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes))
        with disable_mtp_completeness_check():
            packed_broadcast_consumer(metadata, self.model_update_group, 0, self.model.load_weights,
                                      self.packed_buffer_size_bytes, device="cpu")

    def finish_weight_update(self) -> None:
        from rollout.worker_ext import refresh_tied_lm_head

        super().finish_weight_update()
        refresh_tied_lm_head(self.model)
