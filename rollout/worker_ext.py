"""vLLM worker extension: load new weights into a *running* engine (the CPU / object-store transport).

vLLM mixes this class into its worker (`worker_extension_cls="rollout.worker_ext.WeightSyncExtension"`),
so `AsyncLLM.collective_rpc("finemem_reload_safetensors", args=(blob,))` runs the method inside every
worker process. The worker is a fresh spawned process: this module must be importable there (the
engine actor puts the repository on PYTHONPATH) and must stay light at import time.

Why these steps (cpu-stack.md section 4):
- tensors cannot travel through `collective_rpc` (msgpack turns them into lists), so the weights
  arrive as safetensors **bytes**;
- on CPU, vLLM pre-packs linear weights and removes them from the layers, so a plain
  `model.load_weights` fails: the layer-wise `reload_weights` path re-runs each layer's post-load
  step (re-packing the kernels);
- with tied embeddings no `lm_head.*` tensor is loaded, so the LM head's pre-packed copy of the
  embedding would silently stay old: it is re-processed from the (updated) shared weight.
Method names carry a `finemem_` prefix because vLLM refuses extension attributes that clash
with the worker's own.

Importing this module also registers the `nccl_cpu` weight-transfer backend
(`rollout.cpu_group_transfer`, the CPU stand-in for `nccl`) with vLLM's factory: vLLM imports the
extension in `init_worker`, before `load_model` creates the worker's weight-transfer engine. The
registration is lazy (a module path), so this import stays light.
"""

from __future__ import annotations

import time


def register_cpu_weight_backend() -> None:
    """Register `nccl_cpu` with vLLM's worker-side `WeightTransferEngineFactory` (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from rollout.weight_sync import CPU_BACKEND

    try:
        WeightTransferEngineFactory.register_engine(CPU_BACKEND, "rollout.cpu_group_transfer",
                                                    "CPUBroadcastWeightTransferEngine")
    except ValueError:  # already registered (module re-imported in one process)
        pass


register_cpu_weight_backend()


def refresh_tied_lm_head(model) -> bool:
    """Re-run the LM head's post-load step when it shares its weight with the input embedding.

    Returns True when the head was refreshed. On GPU the step is a no-op; on CPU it re-packs the
    head's kernel copy from the shared (just updated) embedding.
    """
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if lm_head is None or embed is None:
        return False
    lw, ew = getattr(lm_head, "weight", None), getattr(embed, "weight", None)
    if lw is None or ew is None:
        return False
    if lw is ew or (lw.data_ptr() == ew.data_ptr() and lw.shape == ew.shape):
        lm_head.quant_method.process_weights_after_loading(lm_head)
        return True
    return False


class WeightSyncExtension:
    """Mixed into vLLM's worker; `self` is the worker (`self.model_runner`, `self.reload_weights`)."""

    def finemem_reload_safetensors(self, blob: bytes) -> dict:
        """Reload every weight from a safetensors blob of HF-named tensors; returns counts and seconds.

        The caller validates names and shapes against the checkpoint before sending: a failure
        inside `reload_weights` leaves layers on the meta device and the next forward pass kills
        the engine.
        """
        from safetensors.torch import load

        t0 = time.perf_counter()
        if not isinstance(blob, (bytes, bytearray)):
            raise TypeError(f"finemem_reload_safetensors expects bytes, got {type(blob).__name__}")
        tensors = load(bytes(blob))
        model = self.model_runner.get_model()
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        pairs = [(k, v) for k, v in tensors.items() if not (tied and k.startswith("lm_head."))]
        t1 = time.perf_counter()
        # Worker.reload_weights wraps the model runner's call in the vLLM config context.
        self.reload_weights(weights_iterator=iter(pairs), is_checkpoint_format=True)
        refreshed = refresh_tied_lm_head(model)
        t2 = time.perf_counter()
        return {"tensors": len(pairs), "decode_s": t1 - t0, "reload_s": t2 - t1, "lm_head_refreshed": refreshed}

    def finemem_embedding_sum(self) -> float:
        """Sum of the input embedding (a cheap fingerprint of the served weights, for tests)."""
        model = self.model_runner.get_model()
        return float(model.model.embed_tokens.weight.double().sum().item())
