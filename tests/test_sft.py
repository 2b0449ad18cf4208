"""SFT warm start: trace construction (pure), batching maths, batched generation, and one short real run."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch
from helpers_tokenizer import build_test_tokenizer

from finemem.config import DataConfig, MemoryConfig, SFTConfig
from finemem.data.synth import generate_instances
from finemem.memory import FlatMemory
from finemem.prompts import PromptBuilder
from finemem.teacher import TeacherNoise, run_teacher_episode
from finemem.toolcalls import render_tool_calls
from learner.sft import (
    IGNORE,
    BatchedHFGenerate,
    SFTExample,
    build_examples,
    collate,
    copy_examples,
    lr_at,
    make_batches,
    repeat_rare_calls,
    response_loss,
    sft_seed,
    shared_prefix_len,
)
from rollout.types import SamplingSpec

DATA = DataConfig(synth_min_chunks=3, synth_max_chunks=4, synth_questions_per_instance=9)


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


@pytest.fixture(scope="module")
def builder(tok):
    return PromptBuilder(tok, MemoryConfig())


def test_examples_are_teacher_steps_with_exact_prompts_and_eos_targets(tok, builder):
    instances = generate_instances(3, 11, DATA)
    noise = TeacherNoise.from_sft(SFTConfig())
    examples = build_examples(instances, builder, tok, noise, seed=5)
    rng = random.Random(5)  # one stream over all instances, as build_examples does
    replay = [st for inst in instances for st in run_teacher_episode(inst, noise, rng)]
    assert len(examples) == len(replay) == sum(i.num_steps for i in instances)
    saw_skip = saw_call = False
    for ex, st in zip(examples, replay):
        inst = next(i for i in instances if i.instance_id == ex.instance_id)
        assert ex.step == st.step
        memory = FlatMemory.restore(st.memory_before, st.next_id)
        assert ex.prompt_ids == list(
            builder.build(memory, inst.chunks[st.step - 1], st.step, inst.num_steps).ids
        )
        assert ex.target_ids[-1] == tok.eos_token_id
        body = tok.decode(ex.target_ids[:-1], skip_special_tokens=False)
        assert body == render_tool_calls(st.calls, "hermes")
        assert ex.tools == tuple(name for name, _ in st.calls)
        saw_skip |= not st.calls and ex.target_ids == [tok.eos_token_id]
        saw_call |= bool(st.calls)
    assert saw_call
    # deterministic for a seed; the noise changes the traces
    assert [e.target_ids for e in build_examples(instances, builder, tok, noise, seed=5)] == [
        e.target_ids for e in examples
    ]
    ideal = build_examples(instances, builder, tok, TeacherNoise(), seed=5)
    assert [e.target_ids for e in ideal] != [e.target_ids for e in examples]
    # too-long examples are dropped, never cut
    short = build_examples(instances, builder, tok, noise, seed=5, max_len=min(e.length for e in examples))
    assert 1 <= len(short) < len(examples) and all(e.length == min(x.length for x in examples) for e in short)


def test_examples_with_updates_or_deletes_are_repeated(tok, builder):
    instances = generate_instances(12, 11, DATA)
    examples = build_examples(instances, builder, tok, TeacherNoise.from_sft(SFTConfig()), seed=5)
    rare = [e for e in examples if {"memory_update", "memory_delete"} & set(e.tools)]
    assert rare and len(rare) < len(examples)
    assert repeat_rare_calls(examples, 1) == examples
    out = repeat_rare_calls(examples, 3)
    assert out[: len(examples)] == examples and len(out) == len(examples) + 2 * len(rare)
    for e in examples:
        assert out.count(e) == (3 if e in rare else 1)
    with pytest.raises(ValueError, match="repeat"):
        repeat_rare_calls(examples, 0)


def test_copy_examples_repeat_a_chunk(tok):
    instances = generate_instances(2, 11, DATA)
    chunks = {c for inst in instances for c in inst.chunks}
    examples = copy_examples(instances, tok, 10, random.Random(0))
    assert len(examples) == 10 and len({tuple(e.prompt_ids) for e in examples}) > 1
    for ex in examples:
        assert ex.target_ids[-1] == tok.eos_token_id
        chunk = tok.decode(ex.target_ids[:-1], skip_special_tokens=False)
        assert chunk in chunks
        assert tok.decode(ex.prompt_ids, skip_special_tokens=False) == chunk + "\n"
    assert copy_examples(instances, tok, 0, random.Random(0)) == []


def test_sft_seed_never_the_eval_seed():
    cfg = DataConfig()
    assert sft_seed(cfg) not in (cfg.synth_train_seed, cfg.synth_eval_seed)
    with pytest.raises(ValueError, match="eval seed"):
        sft_seed(DataConfig(synth_train_seed=1, synth_eval_seed=1 + 7919))


def test_collate_labels_are_the_targets_shifted_by_one():
    exs = [
        SFTExample([5, 6, 7, 8], [9, 2]),
        SFTExample([5, 6, 7], [10, 11, 2]),
        SFTExample([5, 6, 9, 9, 9], [2]),
    ]
    assert shared_prefix_len(exs) == 2
    for skip in (0, 2):
        ids, mask, labels = collate(exs, pad_id=0, skip=skip)
        for row, ex in enumerate(exs):
            seq = (ex.prompt_ids + ex.target_ids)[skip:]
            assert ids[row, : len(seq)].tolist() == seq and int(mask[row].sum()) == len(seq)
            where = (labels[row] != IGNORE).nonzero().flatten().tolist()
            assert labels[row, where].tolist() == ex.target_ids
            assert [ids[row, p + 1].item() for p in where] == ex.target_ids  # label = next input token


def test_make_batches_covers_every_example_once():
    exs = [SFTExample([1] * (i % 7 + 1), [2]) for i in range(50)]
    batches = make_batches(exs, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(50))
    assert all(1 <= len(b) <= 8 for b in batches)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    total, base = 100, 1e-3
    lrs = [lr_at(s, total, base, warmup_ratio=0.1, floor=0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(base / 10) and lrs[9] == pytest.approx(base)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # non-increasing after warm-up
    assert lrs[-1] == pytest.approx(0.1 * base, rel=0.05)


def _tiny_model(vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=0,
    )
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random final-norm gains: greedy outputs that do not just repeat the input
        m.model.norm.weight.copy_(torch.randn(m.model.norm.weight.shape) * 2.0)
    m.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0)
    return m.eval()


def test_shared_prefix_loss_and_gradients_equal_the_full_sequences(tok, builder):
    model = _tiny_model(len(tok))
    exs = build_examples(generate_instances(2, 3, DATA), builder, tok, TeacherNoise(), seed=0)[:5]
    skip = shared_prefix_len(exs)
    assert skip > 50  # the system prompt
    full = response_loss(model, *collate(exs, 0))
    full.backward()
    g_full = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    shared = response_loss(model, *collate(exs, 0, skip), torch.tensor(exs[0].prompt_ids[:skip]))
    shared.backward()
    g_shared = model.model.layers[0].mlp.up_proj.weight.grad
    assert shared.item() == pytest.approx(full.item(), abs=1e-5)
    assert torch.allclose(g_full, g_shared, atol=1e-6)


def test_batched_hf_generate_equals_one_by_one(tok):
    """Left padding in a batch does not change greedy outputs (positions follow the mask)."""
    import asyncio

    model = _tiny_model(len(tok), seed=1)
    gen = BatchedHFGenerate(model, tok)
    prompts = [
        tok.encode(t, add_special_tokens=False)
        for t in ["Mira's locker code is 4821.", "Chunk 1/4:", "The weather was pleasant and the train left."]
    ]
    spec = SamplingSpec(max_tokens=12, temperature=0.0)

    async def together():
        return await asyncio.gather(*(gen(p, spec) for p in prompts))

    batched = asyncio.run(together())
    assert gen.batches == 1
    for p, g in zip(prompts, batched):
        alone = asyncio.run(BatchedHFGenerate(model, tok)(p, spec))
        assert g.token_ids == alone.token_ids
        assert len(g.logprobs) == len(g.token_ids) and all(x <= 0 for x in g.logprobs)
        assert g.finish_reason == ("stop" if g.token_ids[-1] == 2 else "length")
        ref = torch.log_softmax(model(torch.tensor([p + g.token_ids])).logits[0, len(p) - 1 : -1], -1)
        want = ref[torch.arange(len(g.token_ids)), torch.tensor(g.token_ids)]
        assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4)


def test_short_sft_run_lowers_the_loss_and_writes_the_run_dir(tmp_path, capsys):
    from finemem.config import load_config
    from finemem.model_init import corpus_texts, init_model
    from finemem.tracking import read_metrics
    from learner.sft import cli

    cfg = load_config()
    mc = cfg.model
    for k, v in {
        "init_vocab_size": 1024,
        "init_hidden_size": 64,
        "init_layers": 2,
        "init_heads": 2,
        "init_kv_heads": 1,
        "init_head_dim": 32,
        "init_intermediate_size": 128,
        "max_model_len": 1024,
    }.items():
        setattr(mc, k, v)
    model_dir = init_model(tmp_path / "m0", mc, corpus_texts(cfg, 100))
    out = tmp_path / "sft"
    settings = [
        "sft.instances=6",
        "sft.epochs=3",
        "sft.copy_steps=6",
        "sft.copy_batch_size=4",
        "sft.batch_size=4",
        "sft.lr=3e-3",
        "sft.threads=1",  # deterministic: the run without evaluation below must train the same
        "rollout.max_response_tokens=16",
        "data.synth_min_chunks=4",
        "data.synth_max_chunks=4",
        "data.synth_questions_per_instance=9",
        "wandb.mode=disabled",
    ]
    args = ["--model", str(model_dir), "--out", str(out), "--no-progress", f"run.out_dir={tmp_path / 'runs'}",
            *settings, "sft.eval_instances=2"]
    rc = cli(args)
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = re.fullmatch(r"valid-call rate: (\d\.\d+)", lines[-1])
    assert m and 0.0 <= float(m.group(1)) <= 1.0
    (run,) = list((tmp_path / "runs").iterdir())
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "plots/loss.png",
        "sft_summary.json",
        "sft_eval_episodes.jsonl",
    ):
        assert (run / name).is_file(), name
    rows = read_metrics(run / "metrics.jsonl")
    copy_losses = [r["copy_loss"] for r in rows if "copy_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(copy_losses) >= 2 and len(losses) >= 5 and losses[-1] < losses[0] - 1.0
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)  # the copy warm-up and the traces share one step axis
    summary = json.loads((run / "sft_summary.json").read_text())
    assert summary["eval_valid_call_rate"] == pytest.approx(float(m.group(1)), abs=1e-4)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert len((run / "sft_eval_episodes.jsonl").read_text().splitlines()) == 2

    # sft.eval_instances=0: no evaluation (the demo evaluates before RL), the same model and summary
    out0 = tmp_path / "sft0"
    rc = cli(["--model", str(model_dir), "--out", str(out0), "--no-progress", f"run.out_dir={tmp_path / 'runs0'}",
              *settings, "sft.eval_instances=0"])
    assert rc == 0
    assert "held-out accuracy" not in capsys.readouterr().out
    (run0,) = list((tmp_path / "runs0").iterdir())
    summary0 = json.loads((run0 / "sft_summary.json").read_text())
    assert not (run0 / "sft_eval_episodes.jsonl").exists() and "eval_accuracy" not in summary0
    assert summary0["final_loss"] == pytest.approx(summary["final_loss"])  # seeded: same training
