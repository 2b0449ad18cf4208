"""Typed config: defaults resolve, overrides apply, bad keys and types fail naming the key."""

import subprocess
import sys

import pytest

from finemem.config import ConfigError, FineMemConfig, from_yaml_file, load_config, save_config, to_container


def test_defaults_resolve_through_groups():
    cfg = load_config()
    assert cfg.model.name == "tiny"
    assert cfg.reward.preset == "finemem"
    assert cfg.cluster.name == "local"
    assert set(to_container(cfg)) == set(FineMemConfig.__dataclass_fields__)


def test_override_and_group_switch():
    cfg = load_config(["learner.lr=0.5", "reward=outcome_only", "rollout.group_size=8"])
    assert cfg.learner.lr == 0.5
    assert cfg.reward.preset == "outcome_only"
    assert cfg.rollout.group_size == 8


@pytest.mark.parametrize(
    "override, key",
    [("learner.lr=abc", "learner.lr"), ("learner.nope=1", "learner.nope"), ("rollout.group_size=1.5", "group_size")],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([override])


def test_unknown_group_choice_lists_options():
    with pytest.raises(ConfigError, match="choose one of: .*local"):
        load_config(["cluster=no_such_cluster"])


def test_not_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["learner.lr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["learner.lr=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    back = from_yaml_file(tmp_path / "config.yaml")
    assert to_container(back) == to_container(cfg)


def test_config_show_cli():
    out = subprocess.run([sys.executable, "-m", "finemem.cli", "config", "show", "learner.lr=0.125"],
                         capture_output=True, text=True, check=True).stdout
    assert "lr: 0.125" in out and "preset: finemem" in out
    bad = subprocess.run([sys.executable, "-m", "finemem.cli", "config", "show", "learner.zz=1"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "learner.zz" in bad.stderr


def test_reward_metric_is_checked_at_load_against_the_scorer_metrics(tmp_path):
    from finemem.scoring import METRICS

    with pytest.raises(ConfigError, match=r"reward\.metric='mab': choose one of auto, .*substring_exact_match") as e:
        load_config(["reward.metric=mab"])
    assert "\n" not in str(e.value)
    for name in ("auto", *METRICS):
        assert load_config([f"reward.metric={name}"]).reward.metric == name
    with pytest.raises(ConfigError, match=r"reward\.chunk_qa_metric='llm_judge'"):
        load_config(["reward.chunk_qa_metric=llm_judge"])  # chunk questions are scored without a judge
    (tmp_path / "config.yaml").write_text("reward:\n  metric: mab\n")
    with pytest.raises(ConfigError, match=r"reward\.metric"):
        from_yaml_file(tmp_path / "config.yaml")


@pytest.mark.parametrize(
    "override, key",
    [("rollout.temperature=0", r"rollout\.temperature"), ("rollout.top_p=0.9", r"rollout\.top_p")],
)
def test_training_refuses_sampling_the_learner_cannot_reproduce(override, key, tmp_path):
    from finemem.config import validate_training
    from learner.trainer import build_config

    cfg = load_config([override])  # fine for evaluation or `finemem rollout`
    with pytest.raises(ConfigError, match=key) as e:
        validate_training(cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=key):
        build_config([override, f"run.out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # refused before a run directory was made
    validate_training(load_config(["rollout.temperature=0.7"]))
