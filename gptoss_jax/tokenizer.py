"""The gpt-oss tokenizer (o200k_harmony) from openai-harmony, with its vocabulary taken from the `bpe-openai`
package instead of a download."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
from pathlib import Path

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def encodings_dir() -> Path:
    """A folder holding o200k_base.tiktoken, unpacked once from bpe-openai and checked against its sha256."""
    preset = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if preset and _valid(Path(preset) / VOCAB_FILE):
        return Path(preset)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss-jax" / "encodings"
    target = cache / VOCAB_FILE
    if not _valid(target):
        spec = importlib.util.find_spec("bpe_openai")  # locate only: its extension is not needed
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the bpe-openai package is not installed; it ships the o200k vocabulary "
                               "(pip install bpe-openai)")
        source = Path(spec.submodule_search_locations[0]) / "data" / (VOCAB_FILE + ".gz")
        data = gzip.decompress(source.read_bytes())
        if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
            raise RuntimeError(f"{source} does not hold the expected o200k_base vocabulary (sha256 mismatch)")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(target)
    return cache


def _valid(path: Path) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == VOCAB_SHA256


@functools.cache
def harmony_encoding():
    """openai-harmony's HARMONY_GPT_OSS encoding (renders chats, parses completions, encodes and decodes text)."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(encodings_dir())
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
