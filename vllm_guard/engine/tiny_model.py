"""`--model tiny`: a random-weight Llama small enough to serve on any CPU.

Built once into a cache folder (about 4 s, ~250 KB of weights): a byte-level BPE tokenizer
trained on a few sentences, with `<s>`, `</s>`, `<unk>` and a simple chat template, and a
2-layer Llama whose head dimension is 64 (vLLM's CPU attention rejects 16). Its output is
noise, but every part of serving is real: tokenization, prefill, decode, KV cache, usage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SERVED_NAME = "tiny"
MAX_MODEL_LEN = 16384  # long enough that a test can hold a slot for many seconds
_VERSION = "2"  # bump when the recipe changes, so old caches are rebuilt

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "vLLM serves large language models with paged attention and continuous batching.",
    "A guard in front of the engine decides who may use it and when.",
    "Interactive users want their first token fast; batch jobs want throughput.",
    "Tokens per minute, requests per minute, and tokens per day are tenant limits.",
    "Write a short poem about the sea, the wind and the stars at night.",
    "Summarize the following report in three sentences for a busy reader.",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \" @ # $ % & _",
]
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    base = os.environ.get("VLLM_GUARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-guard"
    )
    return Path(base)


def ensure_tiny_model(root: Path | None = None) -> Path:
    """The tiny model's folder, building it first if it is not cached yet."""
    target = (root or cache_dir()) / f"tiny-llama-v{_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        _build(staging)
        try:
            staging.rename(target)  # atomic: a concurrent builder's copy wins, ours is dropped
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=MAX_MODEL_LEN,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("</s>"),
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    model.save_pretrained(out)
