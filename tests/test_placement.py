"""Placement: the 8-GPU preset resolves to disjoint GPU sets; unworkable configs fail early, each
problem on one line naming the key to change; the Ray cluster's resources (not the driver's
CUDA devices) decide what fits."""

import socket

import pytest

from finemem.config import ConfigError, load_config
from finemem.placement import ClusterResources, actor_requests, resolve, resolve_weight_transport, validate

EIGHT_GPU_NODE = ClusterResources(total={"CPU": 128.0, "GPU": 8.0}, nodes=[{"CPU": 128.0, "GPU": 8.0}])


def _cfg(*overrides, tmp_model=None):
    cfg = load_config(list(overrides))
    if tmp_model is not None:
        cfg.model.path = str(tmp_model)
    return cfg


def _gpu(*overrides, model_dir):
    # a free answerer port, so the port check never depends on what else runs on this machine
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    return _cfg("cluster=qwen3_4b_8gpu", "model=qwen3_4b", f"cluster.answerer_port={port}", *overrides,
                tmp_model=model_dir)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_cpu_default_placement(model_dir):
    p = resolve(_cfg(tmp_model=model_dir), ClusterResources(total={"CPU": 4.0}))
    assert p.device == "cpu" and len(p.engine_gpus) == 1
    assert p.weight_transport == "object_store"
    assert p.request("engine").options() == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_eight_gpu_preset_resolves(model_dir):
    cfg = _gpu(model_dir=model_dir)
    p = resolve(cfg, EIGHT_GPU_NODE)
    assert p.learner_gpus == [[0], [1], [2], [3]]
    assert p.engine_gpus == [[4], [5]]
    assert p.answerer_gpus == [6, 7]
    used = [g for grp in p.learner_gpus + p.engine_gpus for g in grp] + p.answerer_gpus
    assert sorted(used) == list(range(8))
    assert cfg.rollout.group_size == 8 and cfg.learner.zero_stage == 2
    assert p.weight_transport == "nccl"
    reqs = {r.role: r for r in p.requests}
    assert (reqs["learner"].count, reqs["learner"].num_gpus) == (4, 1.0)
    assert (reqs["engine"].count, reqs["engine"].num_gpus) == (2, 1.0)
    assert (reqs["reward"].count, reqs["answerer"].num_gpus) == (8, 2.0)


def test_gpus_are_counted_from_the_ray_cluster_not_the_driver(model_dir, monkeypatch):
    """The driver (e.g. a CPU-only head node) sees no CUDA device; the cluster has 8 GPUs on a worker.
    The old code counted torch.cuda.device_count() in the driver and failed with "only 0 GPU(s)"."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    head_without_gpu = ClusterResources(total={"CPU": 136.0, "GPU": 8.0},
                                        nodes=[{"CPU": 8.0}, {"CPU": 128.0, "GPU": 8.0}])
    p = resolve(_gpu(model_dir=model_dir), head_without_gpu)
    assert p.device == "cuda" and p.weight_transport == "nccl"


def test_more_gpus_than_present_fails_with_advice(model_dir):
    cfg = _gpu(model_dir=model_dir)
    with pytest.raises(ConfigError, match=r"cluster.num_gpus=8 but the Ray cluster has only 4 GPU"):
        resolve(cfg, ClusterResources(total={"CPU": 64.0, "GPU": 4.0}))


def test_eight_gpu_preset_on_a_default_local_ray_names_the_cpu_keys(model_dir):
    """The old `make train-8gpu`: no head, the local fallback Ray has 4 CPUs, the roles reserve 11."""
    problems = validate(_gpu(model_dir=model_dir), ClusterResources(total={"CPU": 4.0, "GPU": 8.0}))
    assert len(problems) == 1
    line = problems[0]
    assert "reserve 11 CPUs" in line and "has 4" in line and "\n" not in line
    for key in ("learner.actor_num_cpus", "rollout.actor_num_cpus", "reward.actor_num_cpus", "cluster.num_cpus"):
        assert key in line


def test_one_actor_bigger_than_every_node(model_dir):
    cfg = _cfg("learner.actor_num_cpus=6", tmp_model=model_dir)
    two_small_nodes = ClusterResources(total={"CPU": 8.0}, nodes=[{"CPU": 4.0}, {"CPU": 4.0}])
    problems = validate(cfg, two_small_nodes)
    assert len(problems) == 1 and "one learner actor needs CPU=6 on a single node" in problems[0]
    assert "learner.actor_num_cpus" in problems[0]


def test_custom_resources_missing_or_short(model_dir):
    cfg = _cfg("rollout.num_engines=2", "cluster.rollout_resources.node_rollout=1", tmp_model=model_dir)
    missing = validate(cfg, ClusterResources(total={"CPU": 8.0}))
    assert len(missing) == 1 and "cluster.rollout_resources.node_rollout" in missing[0]
    assert "no node of the Ray cluster has it" in missing[0]
    short = validate(cfg, ClusterResources(total={"CPU": 8.0, "node_rollout": 1.0}))
    assert len(short) == 1 and "2 of 'node_rollout'" in short[0] and "has 1" in short[0]
    ok = ClusterResources(total={"CPU": 8.0, "node_rollout": 2.0}, nodes=[{"CPU": 4.0}, {"CPU": 4.0, "node_rollout": 2.0}])
    assert validate(cfg, ok) == []
    assert resolve(cfg, ok).request("engine").options()["resources"] == {"node_rollout": 1.0}
    bad = _cfg("cluster.learner_resources.CPU=2", tmp_model=model_dir)
    assert any("cluster.learner_resources.CPU" in p for p in validate(bad))


def test_answerer_port_in_use(model_dir):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _gpu(f"cluster.answerer_port={port}", model_dir=model_dir)
        problems = validate(cfg, EIGHT_GPU_NODE)
    assert problems == [(f"cluster.answerer_port={port} is already in use on this node; stop what listens there "
                         "or pick a free port (cluster.answerer_port=N)")]


def test_weight_transport_is_resolved_once(model_dir):
    from rollout.weight_sync import TRANSPORTS

    cpu = _cfg(tmp_model=model_dir)
    assert resolve_weight_transport(cpu, "cpu") == ("object_store", None)
    assert resolve_weight_transport(_gpu(model_dir=model_dir), "cuda") == ("nccl", None)
    nccl_on_cpu = _cfg("rollout.weight_transport=nccl", tmp_model=model_dir)
    with pytest.raises(ConfigError, match="rollout.weight_transport=nccl needs CUDA"):
        resolve(nccl_on_cpu)
    bogus = _cfg("rollout.weight_transport=carrier_pigeon", tmp_model=model_dir)
    assert any(f"choose one of {', '.join(TRANSPORTS)}" in p for p in validate(bogus))
    for name in TRANSPORTS:  # every name weight_sync knows is accepted on the device it suits
        if name not in ("auto", "nccl"):
            on_cpu = _cfg(f"rollout.weight_transport={name}", tmp_model=model_dir)
            assert resolve(on_cpu).weight_transport == name
    from rollout.weight_sync import CPU_BACKEND

    standin_on_gpu = _gpu(f"rollout.weight_transport={CPU_BACKEND}", model_dir=model_dir)
    assert any("CPU stand-in of nccl" in p for p in validate(standin_on_gpu, EIGHT_GPU_NODE))
    gpu_object_store = _gpu("rollout.weight_transport=object_store", model_dir=model_dir)
    assert resolve(gpu_object_store, EIGHT_GPU_NODE).weight_transport == "object_store"


def test_group_size_one_and_missing_model(tmp_path):
    cfg = _cfg("rollout.group_size=1", tmp_model=tmp_path / "missing")
    problems = validate(cfg)
    assert any("group_size" in p for p in problems)
    assert any("finemem model init" in p for p in problems)


def test_role_gpu_mismatch(model_dir):
    cfg = _gpu("learner.num_ranks=2", model_dir=model_dir)
    assert any("learner_gpus" in p for p in validate(cfg, EIGHT_GPU_NODE))


def test_cpu_standin_has_the_gpu_roles_and_fits_four_cpus(model_dir):
    standin = _cfg("cluster=cpu_standin_8gpu", tmp_model=model_dir)
    gpu = _gpu(model_dir=model_dir)
    counts = {r.role: r.count for r in actor_requests(standin)}
    assert counts == {r.role: r.count for r in actor_requests(gpu) if r.role != "answerer"}
    assert counts == {"learner": 4, "engine": 2, "reward": 8, "queue": 1}
    p = resolve(standin, ClusterResources(total={"CPU": 4.0}, nodes=[{"CPU": 4.0}]))
    assert p.device == "cpu" and p.weight_transport == "object_store"
    assert standin.cluster.num_cpus == 4


def test_optimizer_step_counts_are_checked(model_dir):
    assert any("ppo_epochs" in p for p in validate(_cfg("algo.mini_batches=0", tmp_model=model_dir)))
    too_many = _cfg("learner.instances_per_step=2", "rollout.group_size=4", "algo.mini_batches=9", tmp_model=model_dir)
    assert any("more than the rollouts of a step" in p for p in validate(too_many))
    assert validate(_cfg("algo.mini_batches=8", "learner.instances_per_step=2", "rollout.group_size=4",
                         tmp_model=model_dir)) == []


def test_one_gpu_engine_with_the_learner_on_cpu(model_dir):
    """`make gpu-check`'s 2-step run: the engine on the one GPU, the learner rank on the CPU. The
    transport must then be the object store (NCCL needs the learner on a GPU)."""
    one_gpu = ClusterResources(total={"CPU": 16.0, "GPU": 1.0}, nodes=[{"CPU": 16.0, "GPU": 1.0}])
    cfg = _cfg("cluster.num_gpus=1", "cluster.learner_gpus=0", "cluster.rollout_gpus=1", tmp_model=model_dir)
    p = resolve(cfg, one_gpu)
    assert p.device == "cuda" and p.learner_gpus == [[]] and p.engine_gpus == [[0]]
    assert p.weight_transport == "object_store"
    reqs = {r.role: r for r in p.requests}
    assert reqs["learner"].num_gpus == 0.0 and reqs["engine"].num_gpus == 1.0
    nccl = _cfg("cluster.num_gpus=1", "cluster.learner_gpus=0", "cluster.rollout_gpus=1",
                "rollout.weight_transport=nccl", tmp_model=model_dir)
    assert any("cluster.learner_gpus=0 puts it on the CPU" in x for x in validate(nccl, one_gpu))


def test_gpu_check_train_overrides_resolve(model_dir):
    """The overrides bench/gpu_check.py passes to `finemem train` load and place on one GPU."""
    import sys

    sys.path.append(str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))
    import gpu_check

    overrides = [a for a in gpu_check.train_overrides(model_dir, model_dir / "t.jsonl", model_dir / "e.jsonl",
                                                        model_dir / "runs")]
    cfg = _cfg(*overrides, tmp_model=model_dir)
    p = resolve(cfg, ClusterResources(total={"CPU": 16.0, "GPU": 1.0}, nodes=[{"CPU": 16.0, "GPU": 1.0}]))
    assert p.engine_gpus == [[0]] and p.weight_transport == "object_store"
