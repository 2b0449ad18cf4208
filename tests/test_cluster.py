"""The trainer against real Ray clusters: placement is checked against the cluster's resources
before any actor starts, every actor a preset asks for schedules, and roles pinned to nodes by
custom resources really run there (two Ray nodes on this machine, weights and episodes crossing).
Also `make -n train-8gpu`: its own GPU env, a Ray head, then the run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_submit import outside_make
from test_train_integration import _config, setup  # noqa: F401 (the tiny model + data fixture, shared)

ROOT = Path(__file__).resolve().parents[1]
# Guards a wait that would otherwise hang if an actor stayed pending (the failure under test);
# not a speed bound: a healthy run is ready in seconds.
HANG_GUARD_S = 300


# ---- fast ---------------------------------------------------------------------------------------
def test_make_train_8gpu_uses_its_own_env_and_starts_a_ray_head():
    out = subprocess.run(["make", "--no-print-directory", "-n", "train-8gpu", "ARGS=model.path=/models/Qwen3-4B"],
                         cwd=ROOT, env=outside_make(), capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    install = next(i for i, line in enumerate(lines) if "uv pip install" in line)
    head = next(i for i, line in enumerate(lines) if "ray start --head" in line)
    run = next(i for i, line in enumerate(lines) if "finemem train" in line)
    assert install < head < run
    assert "-m venv .venv-gpu" in out and ".venv-gpu/bin/uv pip install --python .venv-gpu/bin/python" in out
    assert "'.[gpu,dev]' torch==2.13.0" in lines[install] and "cpu" not in lines[install]
    assert "--torch-backend" not in out and "--find-links" not in out  # PyPI's CUDA torch, not the CPU build
    assert "ray status" in out  # joins a running cluster instead of starting a second head
    assert re.search(r"RAY_AUTH_MODE=disabled \.venv-gpu/bin/ray start --head --num-cpus=\d+ --num-gpus=\d+", out)
    assert ".venv-gpu/bin/finemem train cluster=qwen3_4b_8gpu model=qwen3_4b cluster.address=auto" in out
    assert "model.path=/models/Qwen3-4B" in out
    assert not re.search(r"(^|\s)\.venv/bin/", out), "train-8gpu must not touch the CPU .venv"
    # the install is its own step: `make -n install-gpu` is the install alone
    alone = subprocess.run(["make", "--no-print-directory", "-n", "install-gpu"], cwd=ROOT, env=outside_make(),
                           capture_output=True, text=True, check=True).stdout
    assert "uv pip install" in alone and "ray" not in alone.replace("uv==", "")


def test_weight_methods_follow_the_resolved_transport():
    from finemem.config import ConfigError
    from learner.trainer import _weight_methods

    assert _weight_methods("object_store") == (None, "publish_weights")
    from rollout.weight_sync import BROADCAST_BACKENDS

    for name in BROADCAST_BACKENDS:  # nccl and its CPU stand-in share the broadcast path
        assert _weight_methods(name) == ("connect_engines_nccl", "publish_weights_nccl")
    with pytest.raises(ConfigError, match="rollout.weight_transport=smoke_signals"):
        _weight_methods("smoke_signals")


# ---- heavy: a real local Ray --------------------------------------------------------------------
@pytest.mark.heavy
def test_cpu_standin_every_actor_schedules_on_a_four_cpu_ray(tmp_path):
    """Every actor the stand-in preset would create, with exactly the trainer's requests, becomes
    ready on a local Ray of 4 CPUs; the 8-GPU preset on that Ray is refused before any actor."""
    import ray

    from finemem.config import ConfigError, load_config
    from finemem.placement import ClusterResources, resolve

    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(["cluster=cpu_standin_8gpu", f"model.path={tmp_path}"])
    ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        placement = resolve(cfg, ClusterResources.from_ray())

        @ray.remote
        class Probe:
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        refs = [Probe.options(**r.options()).remote().node.remote()
                for r in placement.requests for _ in range(r.count)]
        assert len(refs) == 4 + 2 + 8 + 1
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=HANG_GUARD_S)
        assert not pending, f"{len(pending)} of {len(refs)} actors never scheduled"

        gpu_cfg = load_config(["cluster=qwen3_4b_8gpu", "model=qwen3_4b", f"model.path={tmp_path}"])
        with pytest.raises(ConfigError, match="the roles reserve 11 CPUs"):
            resolve(gpu_cfg, ClusterResources.from_ray())
    finally:
        ray.shutdown()


@pytest.mark.heavy
def test_trainer_counts_gpus_from_the_ray_cluster(tmp_path):
    """A Ray cluster with 8 GPUs and a driver without CUDA: the trainer's placement passes (the old
    code counted the driver's torch.cuda devices and stopped with "only 0 GPU(s)"), resolves nccl once,
    and hands that to the engines' spec. Stops at the (missing) data, before any actor."""
    import ray
    import torch

    from finemem.config import ConfigError, load_config
    from finemem.tracking import RunDir
    from learner.trainer import Trainer
    from rollout.engine import EngineSpec

    if torch.cuda.device_count():
        pytest.skip("this test is about a driver without CUDA")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = load_config(["cluster=qwen3_4b_8gpu", "model=qwen3_4b", f"model.path={tmp_path / 'model'}",
                       f"data.train_path={tmp_path / 'missing.parquet'}", "cluster.answerer_port=0",
                       f"run.out_dir={tmp_path / 'runs'}", "wandb.mode=disabled"])
    ray.init(num_cpus=16, num_gpus=8, include_dashboard=False, log_to_driver=False)
    try:
        trainer = Trainer(cfg, RunDir.create(cfg.run.out_dir, "gpus"))
        with pytest.raises(ConfigError, match="missing.parquet: no such data file"):
            trainer.start()
    finally:
        ray.shutdown()
    assert trainer.placement.device == "cuda" and trainer.placement.weight_transport == "nccl"
    assert EngineSpec.from_config(cfg).weight_transport == "nccl"


# ---- heavy: two Ray nodes -----------------------------------------------------------------------
@pytest.mark.heavy
def test_two_nodes_engine_and_learner_apart(setup, monkeypatch):  # noqa: F811 (the imported fixture)
    """Two GRPO steps with the engine pinned to one Ray node and the learner to the other (custom
    resources), so weights, episodes and the queue cross nodes. The weights go through the NCCL
    protocol with its CPU stand-in group (`nccl_cpu`: the same sender, bucket plan and vLLM
    weight-transfer calls as on GPUs, broadcast over gloo), so the cluster's weight path runs too."""
    import ray
    from ray.cluster_utils import Cluster

    from finemem.config import save_config
    from finemem.tracking import RunDir, read_metrics
    from learner.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tmp, model_dir = setup
    cfg = _config(tmp / "two-nodes", model_dir, tmp / "train.jsonl", tmp / "eval.jsonl", total_steps=2)
    cfg.rollout.group_size = 2
    cfg.learner.checkpoint_every = 0
    cfg.learner.use_reference = False
    cfg.cluster.learner_resources = {"node_learner": 1.0}
    cfg.cluster.rollout_resources = {"node_rollout": 1.0}
    cfg.rollout.weight_transport = "nccl_cpu"
    # the nodes' processes inherit this environment (conftest: offline hub, the prebuilt DeepSpeed op)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_learner": 1}, "include_dashboard": False})
    rollout_node = cluster.add_node(num_cpus=2, resources={"node_rollout": 1})
    cluster.wait_for_nodes()
    learner_node_id = cluster.head_node.node_id
    cfg.cluster.address = cluster.address
    run = RunDir.create(cfg.run.out_dir, cfg.run.name)
    save_config(cfg, run.config_path)
    trainer = Trainer(cfg, run)
    try:
        trainer.start()
        trainer.train()

        def where(actor) -> str:
            return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

        engine_node, learner_node = where(trainer.engines[0]), where(trainer.learner.actors[0])
        transport = ray.get(trainer.engines[0].info.remote())["transport"]
        engine_version = ray.get(trainer.engines[0].version.remote())
    finally:
        trainer.shutdown()
        ray.shutdown()
        cluster.shutdown()

    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 2]
    assert engine_node == rollout_node.node_id and learner_node == learner_node_id
    assert engine_node != learner_node
    assert transport == trainer.placement.weight_transport == "nccl_cpu"
    assert engine_version == 2  # both steps' weights arrived over the broadcast group
