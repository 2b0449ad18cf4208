"""The environment every Ray worker of a finemem driver inherits (`finemem train`, `finemem eval`).

Its own module because two drivers need it: the trainer and the evaluation harness (before, the
harness imported the trainer's private helper and the trainer imported the evaluation module).
"""

from __future__ import annotations

import json
import os

KEEP = ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "WANDB_MODE", "PYTHONPATH")


def child_env() -> dict[str, str]:
    """Environment every Ray worker inherits: offline hub, the prebuilt DeepSpeed op, W&B mode.

    Inside `ray job submit`, Ray merges `ray.init`'s runtime env with the job's and refuses the
    job outright if both set the same env var, even to the same value (`_merge_runtime_env` in
    ray/runtime_env/runtime_env.py, Ray 2.60). The job's variables already reach every worker, so
    the keys it sets are left to it.
    """
    env = {k: os.environ[k] for k in KEEP if k in os.environ}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    job_env = job_env_vars()
    return {k: v for k, v in env.items() if k not in job_env}


def job_env_vars() -> dict[str, str]:
    """The env vars of the Ray job this driver runs in ({} outside `ray job submit`).

    The job supervisor hands its runtime env to the entrypoint in RAY_JOB_CONFIG_JSON_ENV_VAR;
    `ray.init` reads the same variable to do the merge.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})
