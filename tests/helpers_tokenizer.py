"""A small byte-level BPE tokenizer with a ChatML chat template, built locally (no downloads).

Tests that need a real Hugging Face tokenizer (chat template, encode/decode of any Unicode text)
use `build_test_tokenizer()`; it is trained once per process on a few sentences and cached.
"""

from __future__ import annotations

from functools import lru_cache

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

_TEXTS = [
    "You manage a memory. Store facts likely to be asked about later.",
    "Mira's locker code is 4821. Mira changed her locker code to 5930.",
    "The weather was pleasant and the train left on time.",
    "Chunk 1/4: Omar's favourite colour is green. Lena lives in Porto.",
    '{"name": "memory_insert", "arguments": {"content": "Lena lives in Porto."}}',
    '{"name": "memory_update", "arguments": {"memory_id": "m1", "new_content": "code 5930"}}',
    '{"name": "memory_delete", "arguments": {"memory_id": "m2"}}',
    "Memory (3 older items hidden): [m1] [m2] [m3] core semantic episodic",
]


@lru_cache(maxsize=1)
def build_test_tokenizer(vocab_size: int = 600):
    """A `PreTrainedTokenizerFast` (byte-level BPE, ChatML template, eos <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
