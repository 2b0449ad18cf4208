"""Supervised warm start (`finemem sft`): teach a policy the tool-call format on scripted-teacher traces.

Why: a random-init policy never emits a parsable call, so RL would have no signal. The traces come
from the *noisy* teacher (`TeacherNoise.from_sft(cfg.sft)`: it misses facts, stores distractors,
misses updates, pads content), so the warm-started policy writes valid calls but leaves RL room to
improve on exactly what the Fine-Mem rewards measure.

One example per (instance, step): the prompt is what the policy would see at that step
(`PromptBuilder` on the teacher's memory before the step), the target is the teacher's calls
rendered in the configured tool format, then the eos token (`<|im_end|>`); a step with no call is
just eos (SKIP); examples with an update or delete call are repeated (`repeat_rare_calls`: otherwise
the policy's argument keys ignore its tool name). The loss is the token mean over target tokens
only. Two savings that leave the loss and gradients unchanged: the LM head runs only at target
positions, and the system prompt every example starts with (about half of a prompt) is computed
once per batch, its keys/values shared by the rows. Plain torch AdamW on CPU, linear warm-up then cosine decay.

After training, the policy runs teacher-free episodes on unseen instances (eval seed) at the
rollout temperature and token limit: the same `rollout.episode.EpisodeRunner` as the vLLM rollout,
over a batched transformers `generate` (for a 5M model, batching the episodes of a round in one
`generate` call takes 10-20 s in all, less than a vLLM engine needs just to start here). The
valid-call rate is valid ops / all ops (a SKIP is one valid op, a truncated response adds an
invalid one); the last line printed is `valid-call rate: <number>`. The run directory holds the
resolved config, metrics.jsonl, plots/loss.png, sft_summary.json and the eval episodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finemem.records import Episode, Instance

# SFT traces come from a stream of their own: train seed + this offset (never the eval seed).
SFT_SEED_OFFSET = 7919
IGNORE = -100
# Examples whose teacher calls include one of these are repeated `RARE_CALL_REPEAT` times per epoch
# (see `repeat_rare_calls`).
RARE_TOOLS = ("memory_update", "memory_delete")
RARE_CALL_REPEAT = 4


@dataclass
class SFTExample:
    """One training example: the step prompt and the target response (both token ids)."""

    prompt_ids: list[int]
    target_ids: list[int]
    instance_id: str = ""
    step: int = 0
    tools: tuple[str, ...] = ()  # names of the teacher calls in the target, in order

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def sft_seed(data_cfg) -> int:
    """The synthetic seed of the SFT instances; refuses to collide with the eval seed."""
    seed = int(data_cfg.synth_train_seed) + SFT_SEED_OFFSET
    if seed == int(data_cfg.synth_eval_seed):
        raise ValueError(
            f"SFT instances would use the eval seed {seed}; change data.synth_train_seed or data.synth_eval_seed"
        )
    return seed


def build_examples(
    instances: list[Instance],
    builder: Any,
    tokenizer: Any,
    noise: Any,
    seed: int,
    tool_format: str = "hermes",
    max_len: int | None = None,
) -> list[SFTExample]:
    """Teacher traces -> examples. Deterministic for a given (instances, noise, seed).

    Examples longer than `max_len` tokens are dropped (the chunk is never cut).
    """
    from finemem.memory import FlatMemory
    from finemem.teacher import run_teacher_episode
    from finemem.toolcalls import render_tool_calls

    if builder.memory_kind != "flat":
        raise ValueError(
            f"SFT traces need memory.kind=flat (the scripted teacher writes flat memory), got "
            f"{builder.memory_kind!r}"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("SFT: the tokenizer has no eos token (needed to end every target)")
    rng = random.Random(seed)
    examples: list[SFTExample] = []
    for inst in instances:
        for st in run_teacher_episode(inst, noise, rng):
            memory = FlatMemory.restore(st.memory_before, st.next_id)
            prompt = builder.build(memory, inst.chunks[st.step - 1], st.step, inst.num_steps)
            text = render_tool_calls(st.calls, tool_format)
            target = (list(tokenizer(text, add_special_tokens=False).input_ids) if text else []) + [eos]
            ex = SFTExample(list(prompt.ids), target, inst.instance_id, st.step, tuple(n for n, _ in st.calls))
            if max_len is None or ex.length <= max_len:
                examples.append(ex)
    return examples


def repeat_rare_calls(examples: list[SFTExample], repeat: int) -> list[SFTExample]:
    """`examples` plus `repeat - 1` more copies of each example with an update or delete call.

    Why: in the noisy teacher's traces 95% of calls are inserts (with the demo task: 3,590 inserts,
    174 updates, 15 deletes over 1,761 examples). Trained on them as they are, the policy picks
    the argument keys from the context alone, ignoring the tool name it has just written
    (measured by teacher forcing: P(`memory_id` key) = 0.033 after `memory_update` and after
    `memory_insert` alike). At temperature 1 the name and the keys are then drawn independently, and
    an update with `content` or an insert with `memory_id`/`new_content` is an invalid call:
    5.6% of all ops, the largest part of the 8.5% invalid ones (valid-call rate 0.915 on 128
    held-out instances). With each such example seen 4 times per epoch the keys follow the name
    (P = 1.000 / 0.000) and the rate was 0.975; the policy writes more updates where the teacher
    does (update ops per step 0.05 -> 0.13), the rest of the noisy teacher's mistakes stay.
    """
    if repeat < 1:
        raise ValueError(f"repeat_rare_calls: repeat must be >= 1, got {repeat}")
    rare = [ex for ex in examples if any(name in RARE_TOOLS for name in ex.tools)]
    return examples + rare * (repeat - 1)


def copy_examples(instances: list[Instance], tokenizer: Any, n: int, rng: random.Random) -> list[SFTExample]:
    """`n` copy warm-up examples: prompt = a chunk and a newline, target = the same chunk again, then eos.

    Why: a policy trained from scratch on the traces alone learns the call format but not to copy
    facts from the chunk: it writes made-up facts, whose near-uniform content tokens also break
    the JSON now and then at temperature 1. Copying needs induction-style attention (find the
    earlier occurrence of the current token, emit what followed it). On this dense copy task it
    forms within a few hundred steps (measured: copy loss 7.36 -> 0.19 in 400 steps of 16). Warm
    starts without it reached held-out accuracy 0.00-0.01; the demo's, with it, 0.29 greedy and
    0.17 sampled. The warm-up runs at a constant learning rate (`lr_floor=1`) after its warm-up.
    Chunks are drawn from `instances` in a shuffled order, round-robin.
    """
    eos = tokenizer.eos_token_id
    chunks = [c.strip() for inst in instances for c in inst.chunks if c.strip()]
    if not chunks or n <= 0:
        return []
    rng.shuffle(chunks)
    newline = list(tokenizer("\n", add_special_tokens=False).input_ids)
    encoded = [list(ids) for ids in tokenizer(chunks, add_special_tokens=False).input_ids]  # once per chunk
    return [SFTExample(ids + newline, ids + [eos], "copy", 0) for ids in (encoded[i % len(encoded)] for i in range(n))]


def make_batches(examples: list[SFTExample], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length (little padding), in random order.

    Examples are shuffled, cut into pools of 32 batches, sorted by length inside a pool, batched,
    and the batches shuffled: random enough for SGD, and padding stays small.
    """
    if batch_size < 1:
        raise ValueError(f"sft.batch_size must be >= 1, got {batch_size}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: examples[i].length)
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def shared_prefix_len(examples: list[SFTExample]) -> int:
    """Length of the token prefix every prompt starts with (the system prompt), kept strictly
    shorter than the shortest prompt so every example still has a prompt token of its own."""
    if not examples:
        return 0
    first = examples[0].prompt_ids
    n = min(len(ex.prompt_ids) for ex in examples) - 1
    for ex in examples[1:]:
        ids = ex.prompt_ids
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


def collate(examples: list[SFTExample], pad_id: int, skip: int = 0):
    """Right-padded `input_ids`, `attention_mask` and next-token `labels` (IGNORE off target) of
    the examples with their first `skip` tokens (the shared prefix) removed."""
    import torch

    width = max(ex.length for ex in examples) - skip
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        seq = (ex.prompt_ids + ex.target_ids)[skip:]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        # position p predicts token p + 1: the target tokens are predicted from positions P-1 .. P+R-2
        p = len(ex.prompt_ids) - skip
        labels[row, p - 1 : p - 1 + len(ex.target_ids)] = torch.tensor(ex.target_ids)
    return ids, mask, labels


def response_loss(model, ids, mask, labels, prefix=None):
    """Token-mean cross-entropy over the target tokens; the LM head runs only where labels exist.

    `prefix` (1-D ids shared by every row, removed from `ids`) is run once and its keys/values
    repeated over the batch: the system prompt costs one sequence per batch instead of B, with
    the same loss and gradients as the full sequences.
    """
    import torch
    import torch.nn.functional as F

    # model.model / lm_head for Qwen3, Llama
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if prefix is not None and len(prefix) > 0:
        cache = decoder(input_ids=prefix.unsqueeze(0), use_cache=True).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        full_mask = torch.cat([torch.ones((ids.shape[0], len(prefix)), dtype=mask.dtype), mask], dim=1)
        hidden = decoder(input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=True)
        hidden = hidden.last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    where = labels != IGNORE
    logits = head(hidden[where])
    return F.cross_entropy(logits.float(), labels[where])


def lr_at(step: int, total: int, base: float, warmup_ratio: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to `floor * base`."""
    warmup = max(1, round(total * warmup_ratio))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    model,
    examples: list[SFTExample],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int = 0,
    tracker=None,
    log_every: int = 5,
    progress: bool = True,
    key: str = "loss",
    desc: str = "sft",
    step_offset: int = 0,
    lr_floor: float = 0.1,
) -> list[float]:
    """AdamW over `epochs` passes; returns the loss of every optimizer step.

    Logged every `log_every` steps as `<key>`, `<key>_avg`, lr and tokens/s at step
    `step_offset + step` (so stages of one run share one step axis). The learning rate warms up,
    then decays by cosine to `lr_floor * lr` (`lr_at`).
    """
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    plan = [b for _ in range(epochs) for b in make_batches(examples, batch_size, rng)]
    if not plan:
        raise ValueError("SFT: no training examples")
    skip = shared_prefix_len(examples)
    prefix = torch.tensor(examples[0].prompt_ids[:skip], dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(plan, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, len(plan), lr, floor=lr_floor)
        ids, mask, labels = collate([examples[i] for i in batch], pad_id, skip)
        loss = response_loss(model, ids, mask, labels, prefix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.item()))
        tokens += int(mask.sum()) + skip * len(batch)
        if step % log_every == 0 or step == len(plan) - 1:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            bar.set_postfix(loss=f"{recent:.3f}")
            if tracker is not None:
                elapsed = time.perf_counter() - start
                tracker.log(
                    {key: losses[-1], f"{key}_avg": recent, "lr": opt.param_groups[0]["lr"],
                     "epoch": step * epochs / len(plan), "tokens_per_s": tokens / elapsed},
                    step=step_offset + step,
                )  # fmt: skip
    bar.close()
    model.eval()
    return losses


class BatchedHFGenerate:
    """An async `generate(prompt_ids, SamplingSpec) -> Generation` over transformers `model.generate`.

    Concurrent callers are collected and served by one left-padded `generate` call per batch (the
    episodes of a round share a batch), so `EpisodeRunner` runs over it unchanged. Sampling is
    seeded once (`torch.manual_seed`), not per request; logprobs are those of the sampled
    distribution (temperature and top-p applied).
    """

    def __init__(self, model, tokenizer, max_batch: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos_ids = sorted(set(eos) | {tokenizer.eos_token_id})
        self._pending: list[tuple[list[int], Any, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.batches = 0

    async def __call__(self, prompt_ids: list[int], params):
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(prompt_ids), params, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        # wait until every runnable episode has submitted (no new request after a yield)
        while True:
            n = len(self._pending)
            await asyncio.sleep(0)
            if len(self._pending) == n:
                break
        while self._pending:
            head = self._pending[0][1]
            key = (head.temperature, head.top_p, head.top_k, head.max_tokens)
            batch = [
                r for r in self._pending if (r[1].temperature, r[1].top_p, r[1].top_k, r[1].max_tokens) == key
            ]
            batch = batch[: self.max_batch]
            self._pending = [r for r in self._pending if all(r is not b for b in batch)]
            try:
                results = self._generate([r[0] for r in batch], head)
            except Exception as e:  # noqa: BLE001 - hand the error to every waiting caller
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, _, fut), gen in zip(batch, results):
                if not fut.done():
                    fut.set_result(gen)

    def _generate(self, prompts: list[list[int]], params):
        import torch

        from rollout.types import Generation

        self.batches += 1
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        greedy = params.temperature == 0
        kwargs: dict[str, Any] = {"do_sample": not greedy}
        if not greedy:
            # top_k=0 switches top-k off (transformers' own default would be 50; vLLM's is off)
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens,
                eos_token_id=self.eos_ids, pad_token_id=self.pad_id, output_scores=True,
                return_dict_in_generate=True, **kwargs,
            )  # fmt: skip
        new = out.sequences[:, width:]
        # scores[k]: processed logits of step k, [B, V] -> logprob of the token sampled there
        logps = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
        chosen = logps.gather(-1, new[:, : logps.shape[1]].unsqueeze(-1)).squeeze(-1)
        eos = set(self.eos_ids)
        results = []
        for row in range(len(prompts)):
            toks = new[row].tolist()
            end = next((k for k, t in enumerate(toks) if t in eos), None)
            if end is None:
                toks, finish = toks[: params.max_tokens], "length"
            else:
                toks, finish = toks[: end + 1], "stop"
            lp = [float(x) for x in chosen[row, : len(toks)].tolist()]
            results.append(Generation(toks, lp, finish, 0))
        return results


def policy_episodes(
    model, tokenizer, builder, instances: list[Instance], cfg, seed: int = 0
) -> list[Episode]:
    """Teacher-free episodes of the policy on `instances` (its own memory evolves), via HF generate."""
    import torch

    from rollout.episode import EpisodeRunner
    from rollout.types import SamplingSpec

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < 100_000_000:
        # decoding a few-million-parameter model is a stream of tiny matmuls: extra threads only add
        # synchronisation (measured here: 1 thread 0.3-0.6 s vs 2 threads 1.8-16 s for the same episodes)
        torch.set_num_threads(1)
    sampling = SamplingSpec(
        max_tokens=int(cfg.rollout.max_response_tokens),
        temperature=float(cfg.rollout.temperature),
        top_p=float(cfg.rollout.top_p),
    )
    gen = BatchedHFGenerate(model, tokenizer)
    runner = EpisodeRunner(
        gen, builder, builder.memory_kind, builder.tool_format, sampling, builder.count_tokens,
        max_model_len=int(cfg.model.max_model_len),
    )  # fmt: skip

    async def run_all():
        return await asyncio.gather(
            *(runner.run_episode(inst, f"sft-eval/{inst.instance_id}") for inst in instances)
        )

    try:
        return list(asyncio.run(run_all()))
    finally:
        torch.set_num_threads(threads)


def retrieval_accuracy(episodes: list[Episode], top_k: int) -> float:
    """Share of global questions whose gold answer (any alias) is in the top-k retrieved items of the
    final memory (the CPU evidence reader's score: substring, lowercased)."""
    from finemem.retrieval import retrieve

    scores = []
    for ep in episodes:
        items = ep.final_memory
        for qa in ep.instance.questions:
            evidence = " ".join(it.content for it, _ in retrieve(qa.question, items, top_k)).lower()
            scores.append(float(any(a.lower() in evidence for a in qa.answers)))
    return sum(scores) / len(scores) if scores else 0.0


def teacher_accuracy(instances: list[Instance], noise, top_k: int, seed: int = 0) -> float:
    """`retrieval_accuracy` of the scripted teacher's final memory (reference points for the policy)."""
    from finemem.records import StepSample
    from finemem.teacher import run_teacher_episode

    rng = random.Random(seed)
    episodes = []
    for inst in instances:
        steps = run_teacher_episode(inst, noise, rng)
        final = StepSample(len(steps), [], [], [], "", [], steps[-1].memory_after)
        episodes.append(Episode(inst.instance_id, inst, 0, [final]))
    return retrieval_accuracy(episodes, top_k)


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies over all cores from /proc/stat, or None where it does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0.0), sum(fields)


def auto_threads(sample_s: float = 0.5) -> int:
    """Torch threads for training: the cores that are idle right now (sampled over `sample_s`), >= 1.

    On a shared 2-core machine two threads against another busy process are far slower than one
    (OpenMP threads wait on each other: measured 300 vs 1,500 tokens/s); on an idle machine two
    are about 1.6x faster than one. The load average would lag behind (a command that just ended
    still counts), so the idle share is measured.
    """
    cores = os.cpu_count() or 1
    before = _cpu_times()
    if before is None or cores == 1:
        return cores
    time.sleep(sample_s)
    after = _cpu_times()
    total = after[1] - before[1]
    if total <= 0:
        return cores
    idle_cores = cores * (after[0] - before[0]) / total
    return max(1, min(cores, int(idle_cores + 0.5)))


def _tracker_wandb(cfg, overrides: list[str]):
    """W&B for SFT only when asked for (`wandb.mode=...` on the command line or WANDB_MODE)."""
    if any(o.startswith("wandb.mode=") for o in overrides) or os.environ.get("WANDB_MODE"):
        return cfg.wandb
    from types import SimpleNamespace

    return SimpleNamespace(mode="disabled")


def cli(argv: list[str]) -> int:
    """`finemem sft --model DIR --out DIR [key=value ...]`: warm start on noisy-teacher traces."""
    from finemem.cli import parse_command
    from finemem.config import load_config, save_config, to_container
    from finemem.model_init import model_folder_problem

    parser = argparse.ArgumentParser(prog="finemem sft", description=cli.__doc__)
    parser.add_argument("--model", default=None, help="input Hugging Face folder (default: model.path)")
    parser.add_argument("--out", required=True, help="where to save the warm-started model + tokenizer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parse_command(parser, argv)
    cfg = load_config(overrides)
    model_dir = Path(args.model or cfg.model.path)
    problem = model_folder_problem(model_dir)
    if problem:
        print(f"finemem sft --model: {problem}")
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finemem.data.synth import generate_instances
    from finemem.prompts import PromptBuilder
    from finemem.teacher import TeacherNoise
    from finemem.tracking import RunDir, Tracker, plot_curves

    torch.set_num_threads(int(cfg.sft.threads) or auto_threads())
    print(f"sft: {torch.get_num_threads()} torch thread(s)")
    t_start = time.perf_counter()
    run = RunDir.create(cfg.run.out_dir, f"{cfg.run.name}-sft")
    save_config(cfg, run.config_path)
    tracker = Tracker(run, to_container(cfg), _tracker_wandb(cfg, overrides))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    builder = PromptBuilder(tokenizer, cfg.memory, cfg.model.tool_format, cfg.model.enable_thinking)
    noise = TeacherNoise.from_sft(cfg.sft)
    seed = sft_seed(cfg.data)
    train_instances = generate_instances(int(cfg.sft.instances), seed, cfg.data)
    examples = build_examples(
        train_instances, builder, tokenizer, noise, seed=cfg.run.seed, tool_format=cfg.model.tool_format,
        max_len=int(cfg.model.max_model_len),
    )  # fmt: skip
    n_traces = len(examples)
    examples = repeat_rare_calls(examples, RARE_CALL_REPEAT)
    n_tokens = sum(ex.length for ex in examples)
    print(
        f"sft: {len(train_instances)} instances -> {n_traces} examples + {len(examples) - n_traces} repeats of "
        f"update/delete ones, {n_tokens:,} tokens/epoch "
        f"(mean example {n_tokens / max(1, len(examples)):.0f} tokens); run dir {run.path}"
    )

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t_train = time.perf_counter()
    copy_steps = int(cfg.sft.copy_steps)
    if copy_steps > 0:
        copy_bs = int(cfg.sft.copy_batch_size)
        warmup = copy_examples(train_instances, tokenizer, copy_steps * copy_bs, random.Random(cfg.run.seed))
        copy_losses = train(
            model, warmup, epochs=1, batch_size=copy_bs, lr=float(cfg.sft.lr), pad_id=pad_id, seed=cfg.run.seed,
            tracker=tracker, progress=not args.no_progress, key="copy_loss", desc="sft copy warm-up", lr_floor=1.0,
        )  # fmt: skip
        print(
            f"sft: copy warm-up {len(copy_losses)} steps, loss {copy_losses[0]:.3f} -> "
            f"{sum(copy_losses[-10:]) / len(copy_losses[-10:]):.3f}"
        )
    else:
        copy_losses = []
    losses = train(
        model, examples, epochs=int(cfg.sft.epochs), batch_size=int(cfg.sft.batch_size), lr=float(cfg.sft.lr),
        pad_id=pad_id, seed=cfg.run.seed, tracker=tracker, progress=not args.no_progress,
        step_offset=len(copy_losses),
    )  # fmt: skip
    train_s = time.perf_counter() - t_train
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    plot_curves(
        run.metrics_path, run.plots_dir / "loss.png", ["copy_loss", "loss", "loss_avg", "lr"], title="SFT"
    )

    result: dict[str, Any] = {
        "examples": len(examples),
        "copy_steps": len(copy_losses),
        "optimizer_steps": len(copy_losses) + len(losses),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_s": train_s,
    }
    episodes: list[Episode] = []
    if int(cfg.sft.eval_instances) > 0:  # 0: no evaluation here (`make demo` evaluates before RL anyway)
        episodes = _evaluate_warm_start(model, tokenizer, builder, noise, cfg, result)
    result["total_s"] = time.perf_counter() - t_start
    tracker.log(result, step=len(copy_losses) + len(losses))
    tracker.close()
    (run.path / "sft_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"model saved to {out}; loss curve {run.plots_dir / 'loss.png'}")
    print(f"train {train_s:.0f}s, total {result['total_s']:.0f}s; final loss {result['final_loss']:.4f}")
    if episodes:
        with open(run.path / "sft_eval_episodes.jsonl", "w") as f:
            f.writelines(json.dumps(ep.to_dict()) + "\n" for ep in episodes)
        top_k = int(cfg.retrieval.top_k)
        print(
            f"held-out accuracy (top-{top_k} retrieval): policy {result['eval_accuracy']:.3f}, noisy teacher "
            f"{result['teacher_noisy_accuracy']:.3f}, ideal teacher {result['teacher_ideal_accuracy']:.3f} "
            f"({result['eval_s']:.0f}s)"
        )
        kinds = ("insert", "update", "delete", "skip", "invalid")
        print("ops per step: " + ", ".join(f"{k} {result[f'eval_ops_per_step/{k}']:.2f}" for k in kinds))
        refused = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("eval_invalid/")}
        if refused:
            print("invalid ops (share of all ops): " + ", ".join(f"{k} {v:.3f}" for k, v in refused.items()))
        print(f"valid-call rate: {result['eval_valid_call_rate']:.4f}")
    return 0


def _evaluate_warm_start(model, tokenizer, builder, noise, cfg, result: dict[str, Any]) -> list[Episode]:
    """Run the warm start on `sft.eval_instances` held-out instances; add its figures (and the noisy
    and ideal teachers' accuracy on the same instances, for reference) to `result`."""
    from finemem.data.synth import generate_instances
    from finemem.teacher import TeacherNoise
    from rollout.summary import summarize_episodes

    t_eval = time.perf_counter()
    eval_instances = generate_instances(int(cfg.sft.eval_instances), int(cfg.data.synth_eval_seed), cfg.data)
    episodes = policy_episodes(model, tokenizer, builder, eval_instances, cfg, seed=cfg.run.seed)
    summary = summarize_episodes(episodes, time.perf_counter() - t_eval)
    top_k = int(cfg.retrieval.top_k)
    result.update(
        {
            "eval_s": time.perf_counter() - t_eval,
            "eval_valid_call_rate": summary["valid_call_rate"],
            "eval_ops_per_step": summary["ops_per_step"],
            "eval_memory_tokens_final": summary["memory_tokens_final"],
            "eval_finish_length": summary.get("finish/length", 0.0),
            "eval_accuracy": retrieval_accuracy(episodes, top_k),
            "teacher_noisy_accuracy": teacher_accuracy(eval_instances, noise, top_k, seed=cfg.run.seed),
            "teacher_ideal_accuracy": teacher_accuracy(eval_instances, TeacherNoise(), top_k, seed=cfg.run.seed),
        }
    )
    for kind in ("insert", "update", "delete", "skip", "invalid"):
        result[f"eval_ops_per_step/{kind}"] = summary[f"ops_per_step/{kind}"]
    for key, share in summary.items():
        if key.startswith("invalid/"):
            result[f"eval_{key}"] = share
    return episodes
