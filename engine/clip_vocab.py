"""CLIP tokenizer files, built offline from the CLIP BPE file shipped in `engine/vocab/`.

SD 1.x, SD 2.x and SDXL all tokenize with OpenAI CLIP's byte-level BPE (49408 tokens). The
hub repos carry it as `vocab.json` + `merges.txt`; OpenAI's CLIP repository (MIT) carries the
same data as `bpe_simple_vocab_16e6.txt.gz`. That file ships in this project (engine/vocab/,
with its license), so no package is installed only for it and the Cog image needs no extra
build step; we derive the two tokenizer files from it (reference/loading.md records the
recipe and the check against OpenAI's token ids).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from .errors import ModelLoadError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file (its first line is a header).
MERGE_COUNT = 49152 - 256 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77


BPE_PATH = Path(__file__).resolve().parent / "vocab" / BPE_FILE


def find_bpe_file() -> Path:
    """Path of the CLIP BPE file that ships with the engine."""
    if not BPE_PATH.is_file():
        raise ModelLoadError(
            f"The CLIP vocabulary file {BPE_PATH} is missing: it is part of the project "
            "(engine/vocab/); restore it from the repository."
        )
    return BPE_PATH


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and merge list."""
    with gzip.open(find_bpe_file(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 1 + MERGE_COUNT]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, *, pad_token: str) -> None:
    """Write a CLIPTokenizer folder. SD1's pad is EOS; OpenCLIP models (SD2, SDXL's second
    encoder) pad with "!" (id 0), as their hub tokenizers do."""
    vocab, merges = vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "do_lower_case": True,
        # transformers 5 needs this explicitly or padding to max length overflows (loading.md).
        "model_max_length": MAX_LENGTH,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
