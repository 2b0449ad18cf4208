"""Learner-side weight publishing: `learner.actor.stream_weights` and the LearnerGroup publish path.

Pure tests run a plain module through `stream_weights` on rank 0. Heavy tests start a real 2-rank
gloo DeepSpeed learner (ZeRO-3 and ZeRO-2) on local Ray and publish through a recording sender:
a stand-in with `NCCLWeightSender`'s begin/send_bucket/end at the edge of the test, which plans
buckets the same way and records what it is handed. They check the names, order, shapes and
values against the HF checkpoint, and that under ZeRO-3 every rank gathered every bucket while
never holding more than one bucket's parameters (a whole-model gather would show as a higher
`peak_numel`). The GPU test (2 GPUs) publishes over NCCL into a real vLLM engine.
"""

from __future__ import annotations

import sys

import pytest
import torch

from learner.actor import stream_weights, wire_dtype
from rollout.weight_sync import checkpoint_specs, hf_name, plan_buckets

BUCKET_BYTES = 48 * 1024  # the tiny model's fp32 weights (~420 KB) fill many buckets


class RecordingSender:
    """Stands in for `NCCLWeightSender`: plans buckets like it and records every bucket it is sent."""

    def __init__(self, bucket_bytes: int = BUCKET_BYTES, fail_at: str | None = None, fail_bucket: int = 0):
        self.bucket_bytes = bucket_bytes
        self.fail_at, self.fail_bucket = fail_at, fail_bucket
        self.ended = False

    def begin(self, specs, version):
        if self.fail_at == "begin":
            raise RuntimeError("recording sender: begin failed on purpose")
        self.version = version
        self.buckets = plan_buckets(list(specs), self.bucket_bytes)
        self.sent = []
        return self.buckets

    def send_bucket(self, pairs):
        if self.fail_at == "send" and len(self.sent) == self.fail_bucket:
            raise RuntimeError("recording sender: send_bucket failed on purpose")
        self.sent.append([
            {"name": n, "shape": tuple(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "device": t.device.type, "data_ptr": t.data_ptr(), "value": t.detach().to("cpu", copy=True)}
            for n, t in pairs
        ])

    def end(self):
        self.ended = True
        return {"version": self.version, "planned": [[(s.name, s.dtype, s.shape) for s in b] for b in self.buckets],
                "sent": self.sent}


def _tiny_qwen3(out_dir=None, seed: int = 0):
    """A tiny tied-embedding Qwen3 (fp32); saved to `out_dir` when given."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


# ---- pure: stream_weights on one rank ---------------------------------------------------------
def test_wire_dtype_follows_the_engine_dtype():
    model = _tiny_qwen3()
    assert wire_dtype("float32", model) == "float32"
    assert wire_dtype("bfloat16", model) == "bfloat16"  # the engine's dtype, whatever the parameters'
    assert wire_dtype("auto", model) == wire_dtype(None, model) == "float32"  # the parameters' own
    assert wire_dtype("auto", model.to(torch.bfloat16)) == "bfloat16"
    for bad in ("fp32", "int8"):
        with pytest.raises(ValueError, match="model.dtype"):
            wire_dtype(bad, model)


def test_stream_hands_over_the_parameters_themselves_bucket_by_bucket():
    model = _tiny_qwen3()
    sender = RecordingSender()
    report = stream_weights(model, sender, 7, "float32")
    sent = [item for bucket in report["sender"]["sent"] for item in bucket]
    params = dict(model.named_parameters())
    assert report["sender"]["version"] == 7 and sender.ended
    assert len(report["sender"]["sent"]) == len(sender.buckets) >= 3
    assert report["buckets"] == list(range(len(sender.buckets)))
    assert [x["name"] for x in sent] == [hf_name(n) for n in params]  # named_parameters order; tied head once
    assert "lm_head.weight" not in {x["name"] for x in sent}
    # same dtype as the wire: no copy, no trip through the host
    assert all(x["data_ptr"] == params[x["name"]].data_ptr() and x["dtype"] == "float32" for x in sent)


def test_stream_casts_only_when_the_wire_dtype_differs():
    model = _tiny_qwen3()
    report = stream_weights(model, RecordingSender(), 1, "bfloat16")
    params = dict(model.named_parameters())
    for bucket in report["sender"]["sent"]:
        for x in bucket:
            assert x["dtype"] == "bfloat16" and x["data_ptr"] != params[x["name"]].data_ptr()
            assert torch.equal(x["value"], params[x["name"]].detach().to(torch.bfloat16))


def test_stream_failure_on_rank_0_is_raised_and_the_round_is_not_ended():
    model = _tiny_qwen3()
    sender = RecordingSender(fail_at="send", fail_bucket=1)
    with pytest.raises(RuntimeError, match="send_bucket failed on purpose"):
        stream_weights(model, sender, 1, "float32")
    assert not sender.ended and len(sender.sent) == 1
    with pytest.raises(RuntimeError, match="connect the engines first"):
        stream_weights(model, None, 1, "float32")
    assert stream_weights(model, None, 1, "float32", rank=1)["buckets"] == []  # ZeRO 0-2: other ranks idle


# ---- heavy: a 2-rank gloo DeepSpeed learner ----------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for actors that ask no GPU: on a GPU machine the
    # CPU learners would then see CUDA and put both ranks on cuda:0. This restores the hiding.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("publish-qwen3")
    _tiny_qwen3(out)
    return out


def _learner_cfg(model_dir, **learner):
    from test_learner import _cfg

    return _cfg(model_dir, num_ranks=2, use_reference=False, **learner)


def _flat(rank0_report):
    return [item for bucket in rank0_report["sender"]["sent"] for item in bucket]


@pytest.mark.heavy
@pytest.mark.parametrize("zero_stage", [3, 2])
def test_two_rank_learner_publishes_bucket_by_bucket(ray_local, tiny_dir, zero_stage):
    """Every bucket arrives with the checkpoint's names, order and full shapes, in fp32 (the engine's
    dtype), with the learner's exact values; under ZeRO-3 both ranks gather every bucket together,
    one at a time; a failing sender fails the call without leaving a rank stuck in a collective."""
    from ray import cloudpickle
    from safetensors.torch import load_file
    from test_learner import _batch
    from transformers import AutoModelForCausalLM

    from learner.actor import LearnerGroup

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # RecordingSender travels to rank 0
    ray = ray_local
    checkpoint = checkpoint_specs(tiny_dir)
    on_disk = load_file(str(tiny_dir / "model.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    order = [hf_name(n) for n, _ in plain.named_parameters()]
    numel = {hf_name(n): p.numel() for n, p in plain.named_parameters()}
    total = sum(numel.values())

    group = LearnerGroup(_learner_cfg(tiny_dir, zero_stage=zero_stage))
    try:
        group.set_weight_sender(RecordingSender())
        before = group.publish_weights_stream()
        group.train_step(_batch(1, plain.config.vocab_size))
        after = group.publish_weights_stream()
        exported = ray.get(group.export_weights())
        group.set_weight_sender(RecordingSender(fail_at="begin"))
        with pytest.raises(Exception, match="begin failed on purpose"):
            group.publish_weights_stream()
        group.set_weight_sender(RecordingSender(fail_at="send", fail_bucket=2))
        with pytest.raises(Exception, match="send_bucket failed on purpose"):
            group.publish_weights_stream()
        group.set_weight_sender(RecordingSender())
        again = group.publish_weights_stream()  # every rank is still in step after the failures
    finally:
        group.shutdown()

    planned = before[0]["sender"]["planned"]
    n_buckets = len(planned)
    assert n_buckets >= 3
    for report, version in ((before[0], 0), (after[0], 1), (again[0], 1)):
        assert report["sender"]["version"] == version
        sent = _flat(report)
        assert [x["name"] for x in sent] == order == [name for b in planned for name, _, _ in b]
        assert set(order) == set(checkpoint)  # tied: no lm_head, like the checkpoint
        assert all(x["shape"] == tuple(checkpoint[x["name"]][0]) for x in sent)  # full (ds_shape) shapes
        assert all(x["dtype"] == "float32" and x["device"] == "cpu" for x in sent)
    assert all(torch.equal(x["value"], on_disk[x["name"]]) for x in _flat(before[0]))
    assert all(torch.equal(x["value"], exported[x["name"]]) for x in _flat(after[0]))
    assert all(torch.equal(x["value"], exported[x["name"]]) for x in _flat(again[0]))
    assert not torch.equal(_flat(after[0])[0]["value"], on_disk[order[0]])  # the step moved the embedding

    largest_bucket = max(sum(numel[name] for name, _, _ in b) for b in planned)
    if zero_stage == 3:
        for reports in (before, after, again):
            assert [r["buckets"] for r in reports] == [list(range(n_buckets))] * 2  # both ranks, every bucket
        # before any forward nothing is resident: exactly one bucket's parameters at a time on each rank
        assert [r["peak_numel"] for r in before] == [largest_bucket] * 2 and largest_bucket < total
    else:
        assert [r["buckets"] for r in before] == [list(range(n_buckets)), []]  # rank 1 has nothing to do
        assert before[0]["peak_numel"] == total and before[1]["peak_numel"] == 0


# ---- GPU: the NCCL transport, learner to a vLLM engine (needs 2 GPUs; skipped here) --------------
TEXTS = ["Mira's locker code is 4821.", "Chunk 2/5: the train left on time.", "Memory: (empty)",
         "Lena lives in Porto and works as a baker."]


@pytest.mark.gpu
@pytest.mark.heavy
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs: the engine's and the learner's (one NCCL rank per GPU)")
def test_nccl_weight_sync_matches_transformers(ray_local, tmp_path):
    """A 1-rank ZeRO-3 learner on its GPU trains a step and publishes over NCCL to a vLLM engine on
    another GPU; the engine then serves exactly the learner's weights (logprobs match transformers).

    Why two distinct GPUs: the learner's rank 0 and the engine's worker are two ranks of one NCCL
    communicator, and NCCL refuses two ranks of a communicator on the same device ("Duplicate GPU
    detected", ncclInvalidUsage); Ray gives each whole-GPU request its own device.
    Resources on this module's Ray (2 CPUs, all the machine's GPUs): the engine actor and the
    learner rank ask 1 GPU and 0 CPUs each, and nothing else in this module holds a GPU (the CPU
    tests' learners ask none and are shut down), so exactly 2 GPUs are needed and enough.
    """
    from test_engine import MAX_LEN, _hf, _small_model_cfg, _teacher_forced
    from test_learner import _batch, _cfg
    from transformers import AutoTokenizer

    from finemem.config import load_config
    from finemem.model_init import corpus_texts, init_model
    from learner.actor import LearnerGroup
    from rollout.engine import EngineSpec, create_engine_actor

    ray = ray_local
    served = init_model(tmp_path / "served", _small_model_cfg(0), corpus_texts(load_config(), 800))
    start = tmp_path / "learner-start"  # the learner starts from other weights than the engine serves
    _hf(served, seed=1, random_norm=True).save_pretrained(start)
    tok = AutoTokenizer.from_pretrained(served)
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=False), add_special_tokens=False) for t in TEXTS]
    greedy = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    spec = EngineSpec(dtype="float32", max_model_len=MAX_LEN, seed=0, weight_transport="nccl",
                      gpu_memory_utilization=0.3)
    engine = create_engine_actor(str(served), spec, num_cpus=0, num_gpus=1)
    group = None
    try:
        ray.get(engine.start.remote())
        before = ray.get(engine.generate_many.remote(ids, greedy))
        cfg = _cfg(start, use_reference=False, zero_stage=3)
        cfg.model.dtype = "float32"
        group = LearnerGroup(cfg, str(start), num_cpus_per_rank=0, num_gpus_per_rank=1)
        print(f"\n[publish] NCCL connect: {group.connect_engines_nccl([engine])}")
        group.train_step(_batch(1, _hf(served).config.vocab_size))
        version = group.publish_weights_nccl([engine])
        weights = ray.get(group.export_weights())
        assert version == 1 and ray.get(engine.version.remote()) == 1
        after = ray.get(engine.generate_many.remote(ids, greedy))
    finally:
        if group is not None:
            group.shutdown()
        ray.get(engine.shutdown.remote())
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    assert all(g.policy_version == 1 for g in after)
    learner_model = _hf(served, seed=1)
    missing, unexpected = learner_model.load_state_dict(weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied: the embedding is the head
    for p, g in zip(ids, after):  # GPU fp32 vs CPU fp32: looser than the CPU tolerance
        ref, gap = _teacher_forced(learner_model, p, g.token_ids)
        assert max(gap) < 1e-3
        assert max(abs(a - b) for a, b in zip(ref, g.logprobs)) < 1e-3
