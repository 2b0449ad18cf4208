"""The `finemem` console command: a table of sub-commands, each implemented in its own module.

Every command is `finemem <words...> [--flags] [key=value ...]`; the `key=value` words are config
overrides (see `finemem.config`). Modules are imported only when their command runs, so
`finemem config show` never imports Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# (command words) -> "module:function"; the function takes the remaining argv and returns an exit code.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("config", "show"): ("finemem.commands:config_show", "print the resolved configuration"),
    ("doctor",): ("finemem.doctor:cli", "check Python, packages, vLLM, Ray, DeepSpeed, GPUs, answerer, disk"),
    ("data", "synth"): ("finemem.data.synth:cli", "generate seeded synthetic Memalpha-format instances"),
    ("data", "inspect"): ("finemem.data.inspect:cli", "counts per source, chunks, tokens, questions"),
    ("data", "chunk-qa"): ("reward.chunk_qa:cli", "generate and verify chunk-level QA with LLM endpoints"),
    ("data", "import-mab-results"): ("finemem.data.mab_import:cli",
                                     "one instance from a MemoryAgentBench context and results file"),
    ("score",): ("finemem.scoring:cli", "recompute metrics over a results file"),
    ("model", "init"): ("finemem.model_init:cli", "build the local tokenizer and tiny Qwen3 policy"),
    ("sft",): ("learner.sft:cli", "supervised warm start on scripted-teacher traces"),
    ("rollout",): ("rollout.cli:cli", "run memory-agent episodes with vLLM engine actors"),
    ("train",): ("learner.trainer:cli", "Fine-Mem GRPO training on Ray"),
    ("eval",): ("learner.harness:cli", "benchmark a memory manager (policy, openai, rag, long_context, teacher)"),
    ("ablation",): ("learner.ablation:cli", "reward ablation over presets and seeds: table, curves, verdict"),
}


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into (flags and positionals, key=value overrides)."""
    flags, overrides = [], []
    for a in argv:
        if "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            flags.append(a)
    return flags, overrides


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse a command's flags with `parser`; returns (namespace, config overrides)."""
    flags, overrides = split_overrides(argv)
    return parser.parse_args(flags), overrides


def _usage() -> str:
    lines = ["usage: finemem <command> [--flags] [key=value ...]", "", "commands:"]
    for words, (_, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<24} {help_}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            target = COMMANDS[words][0]
            module, func = target.split(":")
            from finemem.config import ConfigError, error_line

            try:
                return int(getattr(importlib.import_module(module), func)(argv[n:]) or 0)
            except ConfigError as e:
                print(f"finemem: config error: {e}", file=sys.stderr)
                return 2
            except Exception as e:  # noqa: BLE001 (the last line of a failed job's log says why)
                # The traceback first, then one line that `ray job logs ... | tail -1` shows.
                traceback.print_exc()
                print(f"finemem: error: {error_line(e, whole=True)}", file=sys.stderr)
                return 1
    print(f"finemem: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
