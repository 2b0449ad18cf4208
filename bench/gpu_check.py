"""`make gpu-check`: everything that needs CUDA, on one GPU, in under 8 minutes, with one summary table.

The CPU suite runs every code path whose only difference on a GPU is the device (the served
answerer, the weight-transfer protocol over a gloo stand-in group, `ray job submit`, two Ray nodes).
What is left can only fail in CUDA itself, and this script runs exactly that, each check in its own
subprocess with its own time limit so one hang cannot eat the budget:

  env          torch sees CUDA; vllm (the CUDA build), ray, deepspeed import; driver and GPU names
  gpu-tests    `pytest -m gpu` (the tests that need 2 GPUs skip themselves on one, with the reason)
  throughput   vLLM generation tokens/s for a Qwen3-0.6B-shaped model built from a local config
               (random weights, nothing downloaded): 64 prompts x 256 new tokens, bf16
  train-2step  the CPU demo's pipeline with the vLLM engine on the GPU: tiny policy, synthetic data,
               2 GRPO steps (learner on CPU, weights into the GPU engine through the object store)

    make gpu-check                 # or: python bench/gpu_check.py [--only env,throughput] [--budget-s 480]

Every row is PASS, FAIL or SKIP with the reason; the exit code is 1 when any check failed. A check
skips (never fails) when what it needs is missing, e.g. no CUDA or no `vllm` in this environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("env", "gpu-tests", "throughput", "train-2step")
# Qwen3-0.6B's shape (its public config.json), so the throughput figure is comparable with that model.
QWEN3_06B_SHAPE = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": True,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}


@dataclass
class Result:
    check: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


def _python() -> str:
    return sys.executable


def _run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `cmd`; returns (exit code, last 40 lines of output). 124 on timeout (its process group is killed)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), **(env or {}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        code = 124
    tail = "\n".join((out or "").splitlines()[-40:])
    return code, tail


def _missing(*modules: str) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def _cuda_gpus() -> int:
    """GPUs torch sees, asked in a subprocess so this process never initialises CUDA itself."""
    code, tail = _run([_python(), "-c", "import torch; print('GPUS', torch.cuda.device_count())"], 120)
    line = next((x for x in tail.splitlines() if x.startswith("GPUS ")), "GPUS 0")
    return int(line.split()[1]) if code == 0 else 0


def check_env(timeout_s: float) -> Result:
    probe = ("import json, torch; d = {'torch': torch.__version__, 'cuda': torch.version.cuda, "
             "'gpus': torch.cuda.device_count(), 'names': [torch.cuda.get_device_name(i) "
             "for i in range(torch.cuda.device_count())]}\n"
             "for m in ('vllm', 'ray', 'deepspeed', 'transformers'):\n"
             "    try:\n        d[m] = __import__(m).__version__\n"
             "    except Exception as e:\n        d[m] = 'MISSING: ' + type(e).__name__ + ': ' + str(e)[:80]\n"
             "print('ENV ' + json.dumps(d))")
    t0 = time.perf_counter()
    code, tail = _run([_python(), "-c", probe], timeout_s)
    line = next((x for x in tail.splitlines() if x.startswith("ENV ")), None)
    if code != 0 or line is None:
        return Result("env", "FAIL", time.perf_counter() - t0, tail.splitlines()[-1] if tail else f"exit {code}")
    info = json.loads(line[4:])
    missing = [k for k in ("vllm", "ray", "deepspeed", "transformers") if str(info[k]).startswith("MISSING")]
    detail = (f"{info['gpus']} x {info['names'][0] if info['names'] else '-'}, torch {info['torch']} "
              f"(CUDA {info['cuda']}), vllm {info['vllm'] if 'vllm' not in missing else 'missing'}")
    if not info["gpus"]:
        return Result("env", "FAIL", time.perf_counter() - t0, "torch sees no CUDA GPU; " + detail)
    if missing:
        return Result("env", "FAIL", time.perf_counter() - t0, f"missing {', '.join(missing)}: install the GPU "
                      "environment (`make gpu-env`); " + detail)
    return Result("env", "PASS", time.perf_counter() - t0, detail)


def check_gpu_tests(timeout_s: float) -> Result:
    t0 = time.perf_counter()
    if _missing("pytest"):
        return Result("gpu-tests", "SKIP", 0.0, "pytest is not installed")
    code, tail = _run([_python(), "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests"], timeout_s)
    summary = next((x for x in reversed(tail.splitlines()) if " passed" in x or " failed" in x
                    or " skipped" in x or "no tests ran" in x), tail.splitlines()[-1] if tail else "")
    if code in (0, 5) and "failed" not in summary and "passed" not in summary:
        return Result("gpu-tests", "SKIP", time.perf_counter() - t0, "nothing ran: " + summary.strip("= ").strip())
    status = "PASS" if code == 0 and "failed" not in summary else "FAIL"
    return Result("gpu-tests", status, time.perf_counter() - t0, summary.strip("= ").strip())


def _throughput_script(model_dir: str, prompts: int = 64, new_tokens: int = 256, max_len: int = 1024,
                       eager: bool = False) -> str:
    """The vLLM part of the throughput check (its own process: vLLM spawns an engine core)."""
    return f"""
import json, time

def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model={model_dir!r}, dtype="bfloat16", max_model_len={max_len}, gpu_memory_utilization=0.5,
              enforce_eager={eager}, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 1000 + 10 for j in range(128)]) for i in range({prompts})]
    sp = SamplingParams(max_tokens={new_tokens}, temperature=1.0, ignore_eos=True, detokenize=False, seed=0)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print("THROUGHPUT " + json.dumps({{"tokens": n, "seconds": dt, "tok_s": n / dt}}))

if __name__ == "__main__":  # vLLM spawns its engine core, which re-imports the main module
    main()
"""


def build_qwen3_06b_shape(out_dir: Path) -> Path:
    """A random-init model with Qwen3-0.6B's shape and the local tiny tokenizer (no hub)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from finemem.config import load_config
    from finemem.model_init import corpus_texts, init_model

    cfg = load_config([])
    tok_dir = init_model(out_dir / "tokenizer-src", cfg.model, corpus_texts(cfg, 400))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = Qwen3Config(**QWEN3_06B_SHAPE, dtype="bfloat16", bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target = out_dir / "qwen3-0.6b-shape"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def check_throughput(timeout_s: float, work: Path) -> Result:
    t0 = time.perf_counter()
    if _missing("vllm", "transformers"):
        return Result("throughput", "SKIP", 0.0, f"missing {', '.join(_missing('vllm', 'transformers'))}")
    if not _cuda_gpus():
        return Result("throughput", "SKIP", time.perf_counter() - t0, "no CUDA GPU")
    build = ("import sys; sys.path.append('bench'); import gpu_check as g, pathlib; "
             f"print('MODEL', g.build_qwen3_06b_shape(pathlib.Path({str(work)!r})))")
    code, tail = _run([_python(), "-c", build], timeout_s / 3)
    model = next((x.split(" ", 1)[1] for x in tail.splitlines() if x.startswith("MODEL ")), None)
    if code != 0 or model is None:
        return Result("throughput", "FAIL", time.perf_counter() - t0, "building the model: " + tail.splitlines()[-1])
    code, tail = _run([_python(), "-c", _throughput_script(model)], timeout_s - (time.perf_counter() - t0))
    line = next((x for x in tail.splitlines() if x.startswith("THROUGHPUT ")), None)
    if code != 0 or line is None:
        return Result("throughput", "FAIL", time.perf_counter() - t0, tail.splitlines()[-1] if tail else f"exit {code}")
    r = json.loads(line.split(" ", 1)[1])
    return Result("throughput", "PASS", time.perf_counter() - t0,
                  f"{r['tok_s']:.0f} tok/s (64 x 256 new tokens, bf16, Qwen3-0.6B shape, random weights)")


def train_overrides(model: Path, train: Path, held_out: Path, runs: Path) -> list[str]:
    """The demo preset cut to 2 steps, with the engine on the one GPU and the learner rank on the CPU
    (NCCL cannot join two ranks on one GPU, so the weights go through the object store)."""
    return ["experiment=demo", f"model.path={model}", f"data.train_path={train}", f"data.eval_path={held_out}",
            f"run.out_dir={runs}", "learner.total_steps=2", "learner.instances_per_step=2", "rollout.group_size=4",
            "cluster.num_gpus=1", "cluster.learner_gpus=0", "cluster.rollout_gpus=1",
            "rollout.weight_transport=object_store", "rollout.gpu_memory_utilization=0.3"]


def check_train_2step(timeout_s: float, work: Path) -> Result:
    t0 = time.perf_counter()
    missing = _missing("vllm", "ray", "deepspeed")
    if missing:
        return Result("train-2step", "SKIP", 0.0, f"missing {', '.join(missing)}")
    if not _cuda_gpus():
        return Result("train-2step", "SKIP", time.perf_counter() - t0, "no CUDA GPU")
    fm = [_python(), "-m", "finemem.cli"]
    steps = [
        fm + ["model", "init", "--out", str(work / "tiny")],
        fm + ["data", "synth", "--out", str(work / "train.jsonl"), "--instances", "16", "--seed", "1"],
        fm + ["data", "synth", "--out", str(work / "eval.jsonl"), "--instances", "4", "--seed", "2"],
        fm + ["train", "--no-eval", *train_overrides(work / "tiny", work / "train.jsonl", work / "eval.jsonl",
                                                       work / "runs")],
    ]
    for cmd in steps:
        left = timeout_s - (time.perf_counter() - t0)
        code, tail = _run(cmd, max(10.0, left))
        if code != 0:
            return Result("train-2step", "FAIL", time.perf_counter() - t0,
                          f"`{' '.join(cmd[3:5])}` exit {code}: {tail.splitlines()[-1] if tail else ''}")
    metrics = sorted((work / "runs").glob("*/metrics.jsonl"))
    rows = [json.loads(x) for x in metrics[-1].read_text().splitlines()] if metrics else []
    if len(rows) < 2:
        return Result("train-2step", "FAIL", time.perf_counter() - t0, f"{len(rows)} metrics rows, expected 2")
    last = rows[-1]
    return Result("train-2step", "PASS", time.perf_counter() - t0,
                  f"2 steps, reward {last.get('reward/mean', float('nan')):.3f}, "
                  f"{last.get('throughput/gen_tokens_per_s', 0):.0f} gen tok/s, sync "
                  f"{last.get('time/weight_sync_s', 0):.2f} s")


def format_table(results: list[Result]) -> str:
    lines = ["| check | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.seconds:.0f} | {r.detail} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time for all checks (default 8 min)")
    args = parser.parse_args(argv)
    chosen = [c for c in args.only.split(",") if c]
    unknown = sorted(set(chosen) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    # Shares of the budget: most of it goes to the two checks that start vLLM.
    share = {"env": 0.08, "gpu-tests": 0.27, "throughput": 0.3, "train-2step": 0.35}
    total = sum(share[c] for c in chosen)
    results: list[Result] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finemem-gpu-check-") as tmp:
        work = Path(tmp)
        for c in chosen:
            left = args.budget_s - (time.perf_counter() - start)
            limit = max(20.0, min(left, args.budget_s * share[c] / total))
            print(f"gpu-check: {c} (up to {limit:.0f} s)", flush=True)
            if c == "env":
                r = check_env(limit)
            elif c == "gpu-tests":
                r = check_gpu_tests(limit)
            elif c == "throughput":
                r = check_throughput(limit, work / "throughput")
            else:
                r = check_train_2step(limit, work / "train")
            results.append(r)
            print(f"gpu-check: {r.check} {r.status} ({r.seconds:.0f} s): {r.detail}", flush=True)
    print()
    print(format_table(results))
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
