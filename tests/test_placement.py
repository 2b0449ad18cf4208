"""Placement: the 8-GPU preset resolves to disjoint GPU sets; unworkable configs fail early."""

import pytest

from finemem.config import ConfigError, load_config
from finemem.placement import resolve, validate


def _cfg(*overrides, tmp_model=None):
    cfg = load_config(list(overrides))
    if tmp_model is not None:
        cfg.model.path = str(tmp_model)
    return cfg


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_cpu_default_placement(model_dir):
    p = resolve(_cfg(tmp_model=model_dir))
    assert p.device == "cpu" and len(p.engine_gpus) == 1


def test_eight_gpu_preset_resolves(model_dir):
    cfg = _cfg("cluster=qwen3_4b_8gpu", "model=qwen3_4b", tmp_model=model_dir)
    p = resolve(cfg, gpus_available=8)
    assert p.learner_gpus == [[0], [1], [2], [3]]
    assert p.engine_gpus == [[4], [5]]
    assert p.answerer_gpus == [6, 7]
    used = [g for grp in p.learner_gpus + p.engine_gpus for g in grp] + p.answerer_gpus
    assert sorted(used) == list(range(8))
    assert cfg.rollout.group_size == 8 and cfg.learner.zero_stage == 2


def test_more_gpus_than_present_fails_with_advice(model_dir):
    cfg = _cfg("cluster=qwen3_4b_8gpu", tmp_model=model_dir)
    with pytest.raises(ConfigError, match="only 4 GPU"):
        resolve(cfg, gpus_available=4)


def test_group_size_one_and_missing_model(tmp_path):
    cfg = _cfg("rollout.group_size=1", tmp_model=tmp_path / "missing")
    problems = validate(cfg)
    assert any("group_size" in p for p in problems)
    assert any("finemem model init" in p for p in problems)


def test_role_gpu_mismatch(model_dir):
    cfg = _cfg("cluster=qwen3_4b_8gpu", "learner.num_ranks=2", tmp_model=model_dir)
    assert any("learner_gpus" in p for p in validate(cfg, 8))


def test_optimizer_step_counts_are_checked(model_dir):
    assert any("ppo_epochs" in p for p in validate(_cfg("algo.mini_batches=0", tmp_model=model_dir)))
    too_many = _cfg("learner.instances_per_step=2", "rollout.group_size=4", "algo.mini_batches=9", tmp_model=model_dir)
    assert any("more than the rollouts of a step" in p for p in validate(too_many))
    assert validate(_cfg("algo.mini_batches=8", "learner.instances_per_step=2", "rollout.group_size=4",
                         tmp_model=model_dir)) == []
