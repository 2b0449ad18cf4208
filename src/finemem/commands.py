"""Small commands that need nothing beyond the config."""

from __future__ import annotations

import argparse

from finemem.cli import parse_command
from finemem.config import load_config, to_yaml


def config_show(argv: list[str]) -> int:
    """`finemem config show [key=value ...]`: print the fully resolved configuration as YAML."""
    parser = argparse.ArgumentParser(prog="finemem config show", description=config_show.__doc__)
    _, overrides = parse_command(parser, argv)
    print(to_yaml(load_config(overrides)), end="")
    return 0
