"""`make submit`: a `ray job submit` of `finemem train` to a Ray cluster's dashboard address.

Fast checks: the command line `make submit` renders (preset, overrides, the `python -m finemem`
entrypoint), the upload leaves out the heavy folders, `learner.ray_env.child_env()` never sets an env
var the job's runtime env also sets (Ray refuses such a job at `ray.init`), and a failing command ends with
one `finemem: error:` line. The heavy test starts a real local Ray head with the `ray` CLI, runs
`make submit` with the 2-step CPU preset and checks the run directory the job left.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from test_train_integration import setup  # noqa: F401 (the tiny model + data fixture, shared)

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
RUNTIME_ENV = ROOT / "conf" / "cluster" / "runtime_env.json"


def outside_make() -> dict[str, str]:
    """This environment without the variables a parent `make` (as in `make test`) passes down: they turn
    on "Entering directory" lines and would hand the parent's flags to the `make` under test."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}


def _make_n(*variables: str) -> str:
    """The `make submit` recipe as the shell would get it (continuation lines joined)."""
    out = subprocess.run(["make", "--no-print-directory", "-n", "submit", *variables], cwd=ROOT, env=outside_make(),
                         capture_output=True, text=True, check=True).stdout
    return " ".join(out.replace("\\\n", " ").split())


def test_submit_command_line_takes_preset_args_and_flags():
    cmd = _make_n("RAY_ADDRESS=http://10.0.0.1:8265", "PRESET=experiment=submit_cpu",
                  "ARGS=--no-eval learner.total_steps=2 run.out_dir=/shared/runs", "SUBMIT_FLAGS=--no-wait")
    assert cmd.startswith("RAY_ADDRESS=http://10.0.0.1:8265 .venv/bin/ray job submit --working-dir . --no-wait ")
    assert '--runtime-env-json "$(cat conf/cluster/runtime_env.json)"' in cmd
    assert cmd.endswith("-- python -m finemem train experiment=submit_cpu cluster.address=auto "
                        "--no-eval learner.total_steps=2 run.out_dir=/shared/runs")
    # The default stays the 8-GPU preset; JOB_PYTHON names the cluster's python.
    default = _make_n("JOB_PYTHON=/opt/env/bin/python")
    assert default.endswith("-- /opt/env/bin/python -m finemem train cluster=qwen3_4b_8gpu model=qwen3_4b "
                            "cluster.address=auto")


def test_runtime_env_uploads_only_the_code():
    env = json.loads(RUNTIME_ENV.read_text())
    assert {".venv", ".venv-gpu", "runs", "artifacts", ".git", "wandb"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray wants string env values"
    # The uploaded src/ goes first on the job's path (driver and workers run in the working dir).
    assert env["env_vars"]["PYTHONPATH"] == "src"


def test_python_m_finemem_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "finemem", "config", "show", "experiment=submit_cpu"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "name: submit-cpu" in out and "total_steps: 2" in out


def test_child_env_never_collides_with_the_job_runtime_env(monkeypatch):
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from learner.ray_env import child_env

    job_env = json.loads(RUNTIME_ENV.read_text())
    job_env["env_vars"]["WANDB_MODE"] = "online"  # a user's runtime env may set any of the kept keys
    # What the job supervisor gives the entrypoint: the job's runtime env, and its env vars set.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    for k, v in job_env["env_vars"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/opt/torch_extensions")
    child = child_env()
    assert not set(child) & set(job_env["env_vars"])
    # Ray's own merge, as `ray.init` runs it inside a job: None means "Failed to merge".
    assert _merge_runtime_env(job_env, {"env_vars": child}) is not None
    assert child["TORCH_EXTENSIONS_DIR"] == "/opt/torch_extensions"  # keys the job leaves unset still pass
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert child_env()["HF_HUB_OFFLINE"] == "1"  # outside a job: unchanged


def _fails(argv):
    raise RuntimeError("engine actor died\n  on node 10.0.0.2")


def test_a_failing_command_ends_with_one_error_line(monkeypatch, capsys):
    from finemem import cli

    monkeypatch.setitem(cli.COMMANDS, ("boom",), (f"{__name__}:_fails", "raises"))
    assert cli.main(["boom"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "finemem: error: RuntimeError: engine actor died on node 10.0.0.2"


# ------------------------------------------------------------------------------------------ heavy
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _head_env() -> dict[str, str]:
    """A user's shell with the venv active: `python` on PATH is the one with finemem's dependencies."""
    env = {k: v for k, v in outside_make().items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", TORCH_COMPILE_DISABLE="1", WANDB_MODE="disabled")
    return env


def _ray_processes(temp_dir: Path, gcs_port: int) -> list:
    """This test's head: processes naming its temp dir or its GCS port, and all their descendants."""
    import psutil

    def ours(args: list[str]) -> bool:
        return any(str(temp_dir) in a or (a.startswith(("--address=", "--gcs-address="))
                                          and a.endswith(f":{gcs_port}")) for a in args)

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if ours(p.info["cmdline"] or []):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _stop_head(temp_dir: Path, gcs_port: int) -> list:
    """Stop only this test's Ray (`ray stop` would stop every Ray on the machine); returns survivors."""
    import psutil

    procs = _ray_processes(temp_dir, gcs_port)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return _ray_processes(temp_dir, gcs_port)


def _job_status(job_id: str, address: str, env: dict[str, str]) -> str:
    """SUCCEEDED, FAILED, STOPPED, or the live status, from `ray job status` (it words each differently)."""
    out = subprocess.run([str(BIN / "ray"), "job", "status", job_id, "--address", address],
                         check=False, capture_output=True, text=True, env=env, timeout=120)
    text = out.stdout + out.stderr
    for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{job_id}' {word}" in text:
            return status
    m = re.search(rf"Status for job '{job_id}': (\w+)", text)
    return m.group(1) if m else "UNKNOWN"


@pytest.mark.heavy
def test_make_submit_runs_two_grpo_steps_on_a_local_ray_head(setup, tmp_path):  # noqa: F811
    from finemem.tracking import read_metrics
    from learner.checkpoint import latest_checkpoint

    data_dir, model_dir = setup
    env = _head_env()
    ray_tmp = Path(tempfile.mkdtemp(prefix="fm-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, dash, client, agent = _free_ports(4)
    address = f"http://127.0.0.1:{dash}"
    out_dir = tmp_path / "runs"
    job_id = f"finemem-submit-{uuid.uuid4().hex[:8]}"
    args = ["--no-eval", f"model.path={model_dir}", "model.max_model_len=1024", "memory.prompt_budget=768",
            f"data.train_path={data_dir / 'train.jsonl'}", f"data.eval_path={data_dir / 'eval.jsonl'}",
            "rollout.max_response_tokens=24", "learner.total_steps=2", "learner.checkpoint_every=1",
            f"run.out_dir={out_dir}"]
    survivors = None
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=4", f"--port={gcs}",
                        f"--dashboard-port={dash}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                        f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                       env=env, check=True, timeout=300)
        make = subprocess.run(["make", "--no-print-directory", "submit", f"RAY_ADDRESS={address}", "PRESET=experiment=submit_cpu",
                               f"ARGS={shlex.join(args)}", f"SUBMIT_FLAGS=--no-wait --submission-id {job_id}"],
                              check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert make.returncode == 0, make.stdout + make.stderr
        # `ray job logs --follow` returns when the job ends (the timeout is a hang guard, not a speed check).
        logs = subprocess.run([str(BIN / "ray"), "job", "logs", job_id, "--address", address, "--follow"],
                              check=False, capture_output=True, text=True, env=env, timeout=1800).stdout
        status = _job_status(job_id, address, env)
        assert status == "SUCCEEDED", f"job {status}; last log lines:\n" + "\n".join(logs.splitlines()[-40:])
    finally:
        survivors = _stop_head(ray_tmp, gcs)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not survivors, f"Ray processes left running: {[p.pid for p in survivors]}"

    m = re.search(r"finemem: run directory (\S+)", logs)
    assert m, logs[-2000:]
    run_dir = Path(m.group(1))
    assert run_dir.parent == out_dir and (run_dir / "config.yaml").is_file()
    saved = (run_dir / "config.yaml").read_text()
    assert "address: auto" in saved and "name: submit-cpu" in saved
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["learner/loss"] is not None and r["batch/samples"] > 0
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name.endswith("000002")
