"""Benchmark: one GRPO step's forward + backward with and without the shared-prefix forward.

Memory-step samples all start with the same system prompt. `learner.loss.sequence_logprobs`
runs that prefix once per micro-batch and repeats its keys/values over the rows
(`share_prefix=True`, the learner's default) instead of once per row. This bench builds a step
batch the size of the demo's (`--instances` x `--group-size` episodes: noisy-teacher traces of
the real prompt builder, so prompt lengths and the system prompt are real), packs it into the
learner's token-budgeted micro-batches, and times the policy-loss forward + backward over all of
them both ways. Passes alternate (full, shared, full, shared, ...; median of `--rounds` each) so
background load does not favour either side.

The last line printed is `ratio: <full seconds / shared seconds>` (the speed-up).

    flock /tmp/finemem-heavy.lock .venv/bin/python bench/learner_prefix.py [--model DIR] [experiment=demo]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="policy folder (default: model.path, else a random tiny one)")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finemem.config import load_config
    from finemem.data.synth import generate_instances
    from finemem.model_init import model_or_tiny
    from finemem.prompts import PromptBuilder
    from finemem.teacher import TeacherNoise
    from learner.batching import TrainSample, assign_loss_weights, collate, make_micro_batches
    from learner.loss import first_scored_position, policy_loss, sequence_logprobs, shared_prefix_len
    from learner.sft import build_examples

    cfg = load_config(args.overrides)
    torch.set_num_threads(args.threads)
    model_dir, tmp = model_or_tiny(args.model or cfg.model.path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    builder = PromptBuilder(tokenizer, cfg.memory, cfg.model.tool_format, cfg.model.enable_thinking)
    noise = TeacherNoise.from_sft(cfg.sft)
    instances = generate_instances(args.instances, int(cfg.data.synth_eval_seed), cfg.data)

    rng = random.Random(0)
    samples = []
    for g in range(args.group_size):  # G traces per instance, as a GRPO group
        for ex in build_examples(instances, builder, tokenizer, noise, seed=g, tool_format=cfg.model.tool_format):
            n = len(ex.target_ids)
            samples.append(
                TrainSample(ex.prompt_ids, ex.target_ids, [-1.0] * n, rng.uniform(-1, 1), f"{ex.instance_id}/{g}", 0)
            )
    assign_loss_weights(samples)
    micro = make_micro_batches(samples, int(cfg.learner.micro_batch_tokens))
    batches = [collate([samples[i] for i in idx], pad_id=int(tokenizer.pad_token_id or 0)) for idx in micro]
    tokens = sum(s.num_tokens for s in samples)
    prefix = [shared_prefix_len(b["input_ids"], first_scored_position(b["response_mask"])) for b in batches]
    print(
        f"{len(samples)} samples, {tokens:,} tokens, {len(batches)} micro-batches of <= "
        f"{cfg.learner.micro_batch_tokens} tokens; shared prefix {min(prefix)}-{max(prefix)} tokens; "
        f"{torch.get_num_threads()} threads"
    )

    def step(share: bool) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for b in batches:
            logp = sequence_logprobs(
                model, b["input_ids"], b["attention_mask"], b["response_mask"], share_prefix=share
            )
            loss, _ = policy_loss(logp, b["old_logprobs"], b["advantages"], b["token_weights"], b["response_mask"])
            loss.backward()
        return time.perf_counter() - t0

    step(True)  # warm-up (allocator, kernels)
    full, shared = [], []
    for _ in range(args.rounds):
        full.append(step(False))
        shared.append(step(True))
    f, s = statistics.median(full), statistics.median(shared)
    print(f"full sequences: {f:.2f}s   shared prefix: {s:.2f}s   (median of {args.rounds})")
    print(f"ratio: {f / s:.2f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
