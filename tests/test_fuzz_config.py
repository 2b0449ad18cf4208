"""Fuzzing `key=value` overrides: every one loads, or fails with a one-line ConfigError naming its key.

The keys come from walking the real dataclass schema (`FineMemConfig`), so a new config field is
fuzzed without touching this file. A loaded config must also resolve (`to_container`), since every
command resolves it before use: a `${...}` that cannot resolve has to fail at load, not later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemem.cli import main
from finemem.config import GROUPS, ConfigError, FineMemConfig, conf_dir, load_config, to_container


def schema_keys(cls: type = FineMemConfig, prefix: str = "") -> tuple[list[str], list[str]]:
    """(leaf keys, section keys) of a dataclass schema, dotted (`reward.answerer.model`)."""
    leaves, sections = [], []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            sections.append(key)
            sub_leaves, sub_sections = schema_keys(typ, key + ".")
            leaves += sub_leaves
            sections += sub_sections
        else:
            leaves.append(key)
    return leaves, sections


LEAVES, SECTIONS = schema_keys()
GROUP_OPTIONS = {g: sorted(p.stem for p in (conf_dir() / g).glob("*.yaml")) for g in (*GROUPS, "experiment")}

identifier = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
weird_text = st.text(max_size=12)

keys = st.one_of(
    st.sampled_from(LEAVES),
    st.sampled_from(SECTIONS),
    st.sampled_from([*GROUPS, "experiment"]),
    identifier,  # unknown top-level key (or, rarely, a real one)
    st.tuples(st.sampled_from(SECTIONS), identifier).map(".".join),  # unknown key in a real section
    st.tuples(st.sampled_from(LEAVES), identifier).map(".".join),  # a key below a leaf
    st.tuples(identifier, identifier, identifier).map(".".join),  # a.b.c, no intermediate exists
    st.tuples(st.sampled_from(LEAVES), st.integers(0, 5)).map(lambda t: f"{t[0]}[{t[1]}]"),  # index syntax
    weird_text.filter(lambda s: "=" not in s),
)

values = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            "null",
            "true",
            "false",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "0x10",
            "1_000",
            "-",
            "~",
            "'",
            '"',
            "[",
            "{",
            "[1, 2]",
            "[a, [b]]",
            "{a: 1}",
            "{a: x}",
            "{}",
            "[]",
            "a: b",
            "${foo}",
            "${run.name}",
            "${oc.env:NO_SUCH_VAR_FINEMEM}",
            "${oc.env:HOME}",
            "${oops",
            "${oc.decode:'[1'}",
            "???",
            "auto",
            "openai",
            "evidence",
            "local",
            "../model/tiny",
            "demo",
        ]
    ),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([o for opts in GROUP_OPTIONS.values() for o in opts]),
    identifier,
    weird_text,
    st.lists(st.one_of(identifier, st.integers(-5, 5).map(str)), max_size=3).map(
        lambda xs: f"[{', '.join(xs)}]"
    ),
    st.dictionaries(identifier, st.integers(-5, 5).map(str), max_size=2).map(
        lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
    ),
)

overrides = st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}")


def names_key(message: str, key: str) -> bool:
    """The message names the key as typed, or as Python quotes it (for keys with control characters)."""
    return key in message or repr(key)[1:-1] in message or key.strip() == ""


def check_one(override: str) -> None:
    key = override.split("=", 1)[0]
    try:
        cfg = load_config([override])
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg, f"{override!r}: multi-line message {msg!r}"
        assert names_key(msg, key.split(".")[0].split("[")[0]), f"{override!r}: key not named in {msg!r}"
        return
    to_container(cfg)  # every command resolves the config: a loaded one must resolve


@settings(max_examples=150, deadline=None)
@given(overrides)
def test_override_loads_or_fails_with_one_line_config_error(override):
    check_one(override)


@settings(max_examples=30, deadline=None)
@given(st.lists(overrides, min_size=2, max_size=4))
def test_several_overrides_load_or_fail_cleanly(words):
    try:
        cfg = load_config(words)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    to_container(cfg)


@settings(max_examples=30, deadline=None)
@given(st.one_of(weird_text, identifier))
def test_word_without_equals_is_a_config_error(word):
    if "=" in word:
        return
    try:
        load_config([word])
    except ConfigError as e:
        assert "key=value" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError(f"{word!r} loaded")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(overrides.filter(lambda ov: not ov.startswith("-")))
def test_config_show_exits_0_or_2_with_one_stderr_line(override):
    code, out, err = run_cli(["config", "show", override])
    assert code in (0, 2), (override, code, err)
    if code == 0:
        assert err == "" and "run:" in out
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("finemem: config error: "), (override, err)
        assert "Traceback" not in err


# ------------------------------------------------------------------------------------------
# The defects the fuzzing found, pinned as plain examples
# ------------------------------------------------------------------------------------------


def test_found_container_type_mismatch_is_a_config_error():
    """A list index on a list field, or a list for a dict field, raised a bare TypeError."""
    for override, key in [
        ("wandb.tags[0]=x", "wandb.tags"),
        ("cluster.learner_resources=[1]", "learner_resources"),
        ("wandb.tags={a: 1}", "wandb.tags"),
    ]:
        try:
            load_config([override])
        except ConfigError as e:
            assert key in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(f"{override} loaded")


def test_found_unresolvable_interpolation_fails_at_load():
    """`${...}` values only resolved when read: load passed and the command crashed later."""
    for override, key in [
        ("run.name=${foo}", "run.name"),
        ("reward.metric=${foo}", "reward.metric"),
        ("run.seed=${run.name}", "run.seed"),
        ("run.name=${oc.env:NO_SUCH_VAR_FINEMEM}", "run.name"),
    ]:
        try:
            load_config([override])
        except ConfigError as e:
            assert key in str(e) and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"{override} loaded")
    assert load_config(["run.name=${run.out_dir}"]).run.name == "runs"  # a good interpolation still works
    code, _, err = run_cli(["config", "show", "run.name=${foo}"])
    assert code == 2 and err.startswith("finemem: config error: ") and "run.name" in err


def test_found_unparsable_value_message_is_one_line():
    for override in ["run.name='unclosed", "run.name=[", "run.seed=${oops", "model.path=\x00"]:
        try:
            load_config([override])
        except ConfigError as e:
            assert "\n" not in str(e) and override.split("=")[0] in str(e), str(e)
        else:
            raise AssertionError(f"{override!r} loaded")
