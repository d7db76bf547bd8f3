"""Textual-inversion embeddings from embeddings/, named in prompts like words (webui).

Formats: `.safetensors` with `emb_params` (SD1/SD2) or `clip_l` + `clip_g` (SDXL), webui's
`.pt` (`string_to_param["*"]`) and diffusers' `.bin` ({token: tensor}), the pickles only through
torch's weights-only loader. A name is the file name without extension; webui matches it by
token sequence, longest first, so any case or spacing that tokenizes the same matches.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import RequestError
from .prompt_parser import EmbeddingMatch

log = logging.getLogger(__name__)

MAX_VECTORS = 75  # a chunk's worth (prompt_parser refuses longer ones too)


@dataclass(frozen=True)
class Embedding:
    name: str
    path: Path
    hash: str  # sha256 of the file, first 12 hex (webui "TI hashes")
    vectors: Mapping[str, torch.Tensor]  # "clip_l" / "clip_g" / "any" -> (n, dim)

    def vectors_for(self, key: str, dim: int) -> torch.Tensor:
        """The vector set for one text encoder (by its key, else any set of that width)."""
        if key in self.vectors and self.vectors[key].shape[-1] == dim:
            return self.vectors[key]
        for tensor in self.vectors.values():
            if tensor.shape[-1] == dim and key not in ("clip_g",):
                return tensor
        raise RequestError.single(
            "prompt",
            self.name,
            f"embedding {self.name!r} has no vectors for this checkpoint's text encoder",
        )

    def fits(self, key: str, dim: int) -> bool:
        try:
            self.vectors_for(key, dim)
        except RequestError:
            return False
        return True

    @property
    def width(self) -> int:
        return max(int(t.shape[0]) for t in self.vectors.values())

    def listing(self) -> dict[str, Any]:
        first = next(iter(self.vectors.values()))
        return {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": int(first.shape[-1]),
            "vectors": int(first.shape[0]),
        }


def _read_vectors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data: Mapping[str, Any] = load_file(str(path))
    else:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    if "string_to_param" in data:  # webui .pt
        return {"any": data["string_to_param"]["*"]}
    if "emb_params" in data:
        return {"any": data["emb_params"]}
    if "clip_l" in data or "clip_g" in data:
        return {k: data[k] for k in ("clip_l", "clip_g") if k in data}
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:  # diffusers learned_embeds.bin: {token: tensor}
        return {"any": tensors[0]}
    raise ValueError("no embedding vectors found")


@dataclass
class EmbeddingCatalog:
    """The embeddings on disk, loaded once at setup (they are small)."""

    items: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    _token_cache: dict[tuple[int, str, int], list[tuple[tuple[int, ...], Embedding]]] = field(
        default_factory=dict
    )

    @classmethod
    def scan(cls, files: Iterable[Path]) -> EmbeddingCatalog:
        catalog = cls()
        for path in files:
            name = path.stem
            if not name.strip():
                # A name of only whitespace tokenizes to nothing and would match before every
                # token of every prompt; webui fails to register such a file and skips it.
                catalog.skipped[name] = "the file name has no text to write in a prompt"
                continue
            try:
                vectors = {
                    k: v.detach().float().reshape(-1, v.shape[-1])
                    for k, v in _read_vectors(path).items()
                }
            except Exception as exc:  # noqa: BLE001 - a bad file is skipped and listed, not fatal
                log.warning("skipping embedding %s: %s", path.name, exc)
                catalog.skipped[name] = str(exc)
                continue
            if max(int(v.shape[0]) for v in vectors.values()) > MAX_VECTORS:
                catalog.skipped[name] = f"more than {MAX_VECTORS} vectors"
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            catalog.items[name] = Embedding(name, path, digest, vectors)
        return catalog

    def get(self, name: str) -> Embedding:
        return self.items[name]

    def finder(
        self, tokenizer: Any, key: str, dim: int
    ) -> Callable[[Sequence[int], int], EmbeddingMatch | None]:
        """webui's token-sequence matcher for one text encoder: longest name first."""
        cache_key = (id(tokenizer), key, dim)
        if cache_key not in self._token_cache:
            candidates = []
            for item in self.items.values():
                if item.fits(key, dim):
                    ids = tuple(tokenizer(item.name, add_special_tokens=False).input_ids)
                    if ids:  # a name with no tokens would match everywhere (see scan)
                        candidates.append((ids, item))
            candidates.sort(key=lambda c: -len(c[0]))
            self._token_cache[cache_key] = candidates
        candidates = self._token_cache[cache_key]

        def find(ids: Sequence[int], position: int) -> EmbeddingMatch | None:
            for name_ids, item in candidates:
                if tuple(ids[position : position + len(name_ids)]) == name_ids:
                    count = int(item.vectors_for(key, dim).shape[0])
                    return EmbeddingMatch(item.name, len(name_ids), (ids[position],) * count)
            return None

        return find

    def listing(self) -> dict[str, Any]:
        """webui GET /sdapi/v1/embeddings."""
        return {
            "loaded": {name: item.listing() for name, item in self.items.items()},
            "skipped": {name: {"reason": why} for name, why in self.skipped.items()},
        }
