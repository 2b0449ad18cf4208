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
