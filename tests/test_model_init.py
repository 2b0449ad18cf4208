"""The local tokenizer and tiny Qwen3 policy (`finemem model init`): pure-ish, CPU, seconds."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemem.config import load_config
from finemem.model_init import (
    CHAT_TEMPLATE,
    MARKER_TOKENS,
    SPECIAL_TOKENS,
    build_config,
    cli,
    corpus_texts,
    init_model,
    model_folder_problem,
    model_or_tiny,
    param_count,
    train_tokenizer,
)
from finemem.toolcalls import parse_tool_calls, render_tool_calls

TOOL_TEXT = render_tool_calls([("memory_insert", {"content": "Ana's code is 4821 ✿ <tool_call> 🙂"}),
                               ("memory_delete", {"memory_id": "m3"})], "hermes")
MEMALPHA_TEXT = render_tool_calls([("memory_insert", {"content": "naïve café"})], "memalpha")


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def corpus(cfg):
    return corpus_texts(cfg, 600)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, 1024)


def test_corpus_holds_prompts_and_teacher_responses(cfg, corpus):
    assert len(corpus) == 600
    assert corpus == corpus_texts(cfg, 600)  # deterministic
    prompts = [t for t in corpus if t.startswith("<|im_start|>system\n")]
    assert prompts and all(t.endswith("<|im_start|>assistant\n") for t in prompts)
    hermes = [t for t in corpus if t.startswith("<tool_call>")]
    memalpha = [t for t in corpus if t.startswith("✿FUNCTION✿")]
    assert hermes and memalpha
    calls = parse_tool_calls(hermes[0].removesuffix("<|im_end|>"))
    assert calls and all(c.error is None for c in calls)


def test_special_and_marker_ids(tok):
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 3
    assert tok.bos_token is None and tok.padding_side == "left"
    assert len(tok) <= 1024
    for m in MARKER_TOKENS:
        ids = tok.encode(m, add_special_tokens=False)
        assert len(ids) == 1, m
        assert tok.decode(ids) == m
    # markers survive skip_special_tokens (they are not special); ChatML specials do not
    ids = tok.encode("<|im_start|>x" + TOOL_TEXT + "<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "x" + TOOL_TEXT


@pytest.mark.parametrize("text", [TOOL_TEXT, MEMALPHA_TEXT, "✿", "  leading and trailing  \n\t", "",
                                  "<|im_end|><|pad|>", "<tool_call", "中文 עברית ﷽ 𝔘𝔫𝔦 \x00\x7f"])
def test_round_trip_examples(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U ✿"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU ✿<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": TOOL_TEXT}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\n" + TOOL_TEXT + "<|im_end|>\n")
    assert tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False) == text.removesuffix(
        "<|im_start|>assistant\n")
    with_tools = tok.apply_chat_template(msgs, tokenize=False, tools=[{"type": "function", "function": {"name": "f"}}])
    assert with_tools.startswith("<|im_start|>system\nS\n\n# Tools\n")
    assert '\n{"type": "function", "function": {"name": "f"}}\n</tools>' in with_tools
    with pytest.raises(Exception, match="unsupported chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_default_size_is_about_five_million(cfg):
    """At the full 8192 vocab the default shape is cpu-stack.md's ~5M reference model (the synthetic
    corpus usually supports fewer merges, e.g. 1505 tokens -> 3.3M parameters)."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(build_config(cfg.model, cfg.model.init_vocab_size))
    n = sum(p.numel() for p in model.parameters())
    assert n == 4_999_936  # the reference model of cpu-stack.md section 2 (same shape)


def test_init_model_saves_and_reloads(cfg, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mc = copy.deepcopy(cfg.model)
    small = {"init_vocab_size": 512, "init_hidden_size": 64, "init_layers": 2, "init_heads": 2, "init_kv_heads": 1,
             "init_head_dim": 32, "init_intermediate_size": 128, "max_model_len": 256}
    for k, v in small.items():
        setattr(mc, k, v)
    path = init_model(tmp_path / "m", mc, corpus)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 256 and (config["eos_token_id"], config["pad_token_id"]) == (2, 3)
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok.encode(TOOL_TEXT)) == TOOL_TEXT
    assert tok.eos_token_id == 2 and tok.padding_side == "left" and tok.chat_template == CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.vocab_size == len(tok)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_count(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # same seed -> identical weights; another seed -> different weights
    again = init_model(tmp_path / "again", mc, corpus)
    other_cfg = copy.deepcopy(mc)
    other_cfg.init_seed = 1
    other = init_model(tmp_path / "other", other_cfg, corpus)
    from safetensors.torch import load_file

    a, b, c = (load_file(p / "model.safetensors") for p in (path, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_cli_builds_a_model(tmp_path, capsys):
    out = tmp_path / "cli-model"
    args = ["--out", str(out), "model.init_tokenizer_texts=200", "model.init_vocab_size=400",
            "model.init_hidden_size=64", "model.init_layers=1", "model.init_heads=2", "model.init_kv_heads=1",
            "model.init_head_dim=32", "model.init_intermediate_size=64", "model.max_model_len=128"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert f"path: {out}" in printed
    assert f"parameters: {param_count(out):,}" in printed
    assert cli(args) == 1  # refuses to overwrite without --force
    assert cli(args + ["--force"]) == 0


def test_model_folder_problem_says_what_is_missing_and_every_command_prints_it(tmp_path, capsys):
    from learner.sft import cli as sft_cli
    from rollout.cli import cli as rollout_main

    assert model_folder_problem(tmp_path / "nope") == (
        f"{tmp_path / 'nope'}: no such folder (a model folder is written by `finemem model init --out DIR`, "
        "`finemem sft` or a checkpoint export)"
    )
    assert "config.json missing" in model_folder_problem(tmp_path)
    assert sft_cli(["--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().out.strip() == f"finemem sft --model: {model_folder_problem(tmp_path)}"
    assert rollout_main(["--model", str(tmp_path), "--episodes", "1", "--out", str(tmp_path / "e.jsonl")]) == 2
    assert capsys.readouterr().out.strip() == f"finemem rollout --model: {model_folder_problem(tmp_path)}"
    (tmp_path / "config.json").write_text("{}")
    assert model_folder_problem(tmp_path) is None


def test_model_or_tiny_uses_an_existing_folder_else_builds_one(cfg, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert model_or_tiny(tmp_path, cfg) == (tmp_path, None)
    small = copy.deepcopy(cfg)
    for k, v in {"init_vocab_size": 512, "init_hidden_size": 64, "init_layers": 1, "init_heads": 2,
                 "init_kv_heads": 1, "init_head_dim": 32, "init_intermediate_size": 128}.items():
        setattr(small.model, k, v)
    small.model.init_tokenizer_texts = 200
    built, tmp = model_or_tiny(tmp_path / "missing", small)
    try:
        assert (built / "config.json").is_file() and (built / "tokenizer.json").is_file()
    finally:
        tmp.cleanup()
    assert not built.exists()
