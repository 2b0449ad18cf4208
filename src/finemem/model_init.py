"""The locally built policy: a byte-level BPE tokenizer and a small random-init Qwen3 (`finemem model init`).

No model hub is reachable on the CPU default, so the policy is built from scratch and saved as an
ordinary Hugging Face folder (config.json, fp32 model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json) that vLLM and transformers both
load offline.

Tokenizer choices (why):
- byte-level BPE, no normalizer, no prefix space, no BOS: `decode(encode(text)) == text` for any
  Unicode text, so response ids can be decoded and parsed without surprises;
- specials `<|endoftext|> <|im_start|> <|im_end|> <|pad|>` (ids 0..3) as in Qwen's ChatML;
  eos = `<|im_end|>` (ends an assistant turn), pad = `<|pad|>`, padding on the left;
- the tool-call markers (`<tool_call>`, `</tool_call>`, `<think>`, `</think>`, `✿FUNCTION✿`,
  `✿ARGS✿`) are single *non-special* added tokens: one id per marker is easy for a tiny model to
  learn, and decoding with `skip_special_tokens=True` still keeps them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
MARKER_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>", "✿FUNCTION✿", "✿ARGS✿")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|endoftext|>"  # the config's bos id (as Qwen3); the tokenizer never adds it

# ChatML, Qwen3-compatible: roles system/user/assistant; `tools` (if given) are appended to the system
# turn exactly as Qwen3 does; `add_generation_prompt` opens the assistant turn. Extra template
# kwargs (e.g. enable_thinking) are accepted and ignored: the tiny model has no thinking mode.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role not in ('system', 'user', 'assistant') %}"
    "{{- raise_exception('unsupported chat role: ' + message.role) }}"
    "{%- elif message.role == 'system' %}"
    "{%- if not loop.first %}{{- raise_exception('a system message must come first') }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train the byte-level BPE on `texts`; returns a `transformers.PreTrainedTokenizerFast`.

    `len(tokenizer) <= vocab_size` (equal when the corpus has enough distinct merges): the BPE gets
    `vocab_size - len(MARKER_TOKENS)` entries (specials and the 256 byte symbols included) and
    the markers are appended after it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = 256 + len(SPECIAL_TOKENS) + len(MARKER_TOKENS)
    if vocab_size <= min_size:
        raise ValueError(f"vocab_size {vocab_size} too small: needs more than {min_size} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKER_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKER_TOKENS])
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} got id {tok.token_to_id(s)}, expected {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens=[BOS_TOKEN, "<|im_start|>"],
    )


def corpus_texts(cfg, n: int) -> list[str]:
    """The tokenizer's training corpus (`n` texts): what the policy will read and write.

    Synthetic instances (`finemem.data.synth`, seed `cfg.data.synth_train_seed`) replayed by the
    SFT-noisy scripted teacher: for every step the exact prompt text (system prompt with the tool
    schemas, memory window, chunk, rendered with `CHAT_TEMPLATE` by transformers' own renderer,
    since the tokenizer does not exist yet) and the teacher's response in both tool-call formats
    followed by eos; plus the system prompts of both memory kinds, the questions and answers.
    Instances (index 0, 1, ...) are generated until `n` texts are collected.
    """
    import random

    from transformers.utils.chat_template_utils import render_jinja_template

    from finemem.data.synth import generate_instance
    from finemem.memory import FlatMemory
    from finemem.prompts import build_messages, system_prompt
    from finemem.teacher import TeacherNoise, run_teacher_episode
    from finemem.toolcalls import render_tool_calls

    if n <= 0:
        raise ValueError(f"corpus_texts: n must be positive, got {n}")
    noise = TeacherNoise.from_sft(cfg.sft)
    rng = random.Random(cfg.model.init_seed)
    texts = [system_prompt(kind, fmt) for kind in ("flat", "memalpha") for fmt in ("hermes", "memalpha")]
    index = 0
    while len(texts) < n:
        inst = generate_instance(cfg.data.synth_train_seed, index, cfg.data)
        index += 1
        for st in run_teacher_episode(inst, noise, rng):
            memory = FlatMemory.restore(st.memory_before, st.next_id)
            messages = build_messages(memory, inst.chunks[st.step - 1], st.step, inst.num_steps, cfg.memory,
                                      cfg.model.tool_format, memory_kind="flat")
            rendered, _ = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=True)
            texts.append(rendered[0])
            for fmt in ("hermes", "memalpha"):
                texts.append(render_tool_calls(st.calls, fmt) + EOS_TOKEN)
        texts.extend(f"{qa.question} {' | '.join(qa.answers)}" for qa in inst.questions)
    return texts[:n]


def build_config(model_cfg, vocab_size: int, bos_id: int = 0, eos_id: int = 2, pad_id: int = 3):
    """The transformers `Qwen3Config` for `model_cfg.init_*` (tied embeddings, context = max_model_len)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=int(vocab_size),
        hidden_size=model_cfg.init_hidden_size,
        intermediate_size=model_cfg.init_intermediate_size,
        num_hidden_layers=model_cfg.init_layers,
        num_attention_heads=model_cfg.init_heads,
        num_key_value_heads=model_cfg.init_kv_heads,
        head_dim=model_cfg.init_head_dim,
        max_position_embeddings=model_cfg.max_model_len,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )


def init_model(out_dir: str | Path, model_cfg, texts: Iterable[str]) -> Path:
    """Train the tokenizer on `texts`, build a random-init Qwen3 (torch seed `model_cfg.init_seed`)
    and save both to `out_dir`; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, model_cfg.init_vocab_size)
    tokenizer.model_max_length = model_cfg.max_model_len
    ids = tokenizer.convert_tokens_to_ids
    config = build_config(model_cfg, len(tokenizer), ids(BOS_TOKEN), ids(EOS_TOKEN), ids(PAD_TOKEN))
    torch.manual_seed(model_cfg.init_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, config.bos_token_id],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def model_folder_problem(path: str | Path) -> str | None:
    """Why `path` is not a loadable Hugging Face model folder, in words, or None when it is one.

    One wording for every command that takes a model folder (sft, rollout, eval, ablation, the
    train preflight), each adding only what it was asked and how to get a folder.
    """
    path = Path(path)
    hint = "a model folder is written by `finemem model init --out DIR`, `finemem sft` or a checkpoint export"
    if not path.is_dir():
        return f"{path}: no such folder ({hint})"
    if not (path / "config.json").is_file():
        return f"{path}: not a Hugging Face model folder, config.json missing ({hint})"
    return None


def model_or_tiny(model_dir: str | Path, cfg) -> tuple[Path, Any]:
    """`model_dir` when it holds a model, else a random-init tiny policy built in a temporary folder.

    For benchmarks that should run on a fresh clone. Returns the folder and the
    `TemporaryDirectory` to clean up (None when `model_dir` was used).
    """
    import tempfile

    model_dir = Path(model_dir)
    if model_folder_problem(model_dir) is None:
        return model_dir, None
    tmp = tempfile.TemporaryDirectory(prefix="finemem-bench-")
    print(f"no model at {model_dir}: building a random-init tiny policy in {tmp.name}")
    return init_model(Path(tmp.name) / "tiny", cfg.model, corpus_texts(cfg, cfg.model.init_tokenizer_texts)), tmp


def param_count(model_dir: str | Path) -> int:
    """Number of distinct parameters stored in a saved model folder (tied weights counted once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def cli(argv: list[str]) -> int:
    """`finemem model init [--out DIR] [--force] [key=value ...]`: build the tokenizer and the tiny policy."""
    from finemem.cli import parse_command
    from finemem.config import load_config

    parser = argparse.ArgumentParser(prog="finemem model init", description=cli.__doc__)
    parser.add_argument("--out", default=None, help="output folder (default: model.path)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model folder")
    args, overrides = parse_command(parser, argv)
    cfg = load_config(overrides)
    out = Path(args.out or cfg.model.path)
    if (out / "config.json").exists() and not args.force:
        print(f"finemem model init: {out} already holds a model (use --force to overwrite)")
        return 1
    texts = corpus_texts(cfg, cfg.model.init_tokenizer_texts)
    path = init_model(out, cfg.model, texts)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    print(f"parameters: {param_count(path):,}")
    print(f"vocab: {vocab} (tokenizer trained on {len(texts)} texts)")
    print(f"path: {path}")
    return 0
