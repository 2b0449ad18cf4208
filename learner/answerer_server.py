"""Start the frozen reasoning model (e.g. Qwen3-32B) as a `vllm serve` inside the training job.

The server runs in a Ray actor that reserves the answerer's GPUs, so Ray places it on a node
with free GPUs (multi-node too) and CUDA_VISIBLE_DEVICES is set by Ray. The actor launches the
OpenAI-compatible server as a subprocess, waits until `/v1/models` answers, and reports its URL;
the trainer then points `reward.answerer.base_url` at it. GPU only; written against vLLM 0.32's
`vllm serve` flags.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request


class AnswererServer:
    def __init__(self, model: str, tensor_parallel: int, port: int, max_model_len: int = 16384,
                 gpu_memory_utilization: float = 0.9):
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--served-model-name", model, "--tensor-parallel-size", str(tensor_parallel),
                    "--port", str(port), "--host", "0.0.0.0", "--max-model-len", str(max_model_len),
                    "--gpu-memory-utilization", str(gpu_memory_utilization), "--disable-log-requests"]
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 1800) -> str:
        import ray

        log = open(f"/tmp/finemem-answerer-{self.port}.log", "ab")  # noqa: SIM115 (the server writes it as long as it runs)
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        url = f"http://{ray.util.get_node_ip_address()}:{self.port}/v1"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.proc.returncode}; "
                                   f"see /tmp/finemem-answerer-{self.port}.log on that node")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(5)
        raise TimeoutError(f"vllm serve did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class _Handle:
    def __init__(self, actor):
        self.actor = actor

    def stop(self) -> None:
        import ray

        try:
            ray.get(self.actor.stop.remote(), timeout=90)
        finally:
            ray.kill(self.actor)


def start_answerer_server(cfg, placement) -> _Handle:
    """Start the server on `cluster.answerer_gpus` GPUs and point the answerer config at it."""
    import ray

    c = cfg.cluster
    actor = ray.remote(num_gpus=c.answerer_gpus, num_cpus=1)(AnswererServer).remote(
        cfg.reward.answerer.model, c.answerer_tensor_parallel, c.answerer_port)
    url = ray.get(actor.start.remote())
    cfg.reward.answerer.base_url = url
    cfg.reward.answerer.kind = "openai"
    print(f"finemem: answerer {cfg.reward.answerer.model} serving at {url}")
    return _Handle(actor)
