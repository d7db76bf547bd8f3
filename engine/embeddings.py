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
    # What the trainer wrote beside the vectors (webui .pt files); None when absent.
    trained: Mapping[str, Any] = field(default_factory=dict)

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

    @property
    def shape(self) -> int:
        """webui's `Embedding.shape`: the vector width; an SDXL pair counts both widths."""
        if "clip_l" in self.vectors and "clip_g" in self.vectors:
            return int(self.vectors["clip_l"].shape[-1] + self.vectors["clip_g"].shape[-1])
        return int(next(iter(self.vectors.values())).shape[-1])

    def listing(self) -> dict[str, Any]:
        """This embedding as webui's `EmbeddingItem` (modules/api/models.py)."""
        main = self.vectors.get("clip_g", next(iter(self.vectors.values())))
        return {
            "step": self.trained.get("step"),
            "sd_checkpoint": self.trained.get("sd_checkpoint"),
            "sd_checkpoint_name": self.trained.get("sd_checkpoint_name"),
            "shape": self.shape,
            "vectors": int(main.shape[0]),
        }


# What webui's create_embedding_from_data reads beside the vectors, with the type it lists.
_TRAINED_KEYS: dict[str, type] = {"step": int, "sd_checkpoint": str, "sd_checkpoint_name": str}


def _read_data(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping):
        raise ValueError("no embedding vectors found")
    return data


def _trained(data: Mapping[str, Any]) -> dict[str, Any]:
    """step / sd_checkpoint / sd_checkpoint_name of a webui .pt (values of another type or
    absent: None, as webui's listing cannot show them)."""
    found = {key: data.get(key) for key in _TRAINED_KEYS}
    return {k: v if isinstance(v, _TRAINED_KEYS[k]) else None for k, v in found.items()}


def _read_vectors(data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
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
    # Every file that cannot be used, with the reason (logged; tests read it).
    skipped: dict[str, str] = field(default_factory=dict)
    # The skipped files whose vectors could be read (webui's listing shows them as skipped).
    unusable: dict[str, Embedding] = field(default_factory=dict)
    _token_cache: dict[tuple[int, str, int], list[tuple[tuple[int, ...], Embedding]]] = field(
        default_factory=dict
    )

    @classmethod
    def scan(cls, files: Iterable[Path]) -> EmbeddingCatalog:
        catalog = cls()
        for path in files:
            name = path.stem
            try:
                data = _read_data(path)
                vectors = {
                    k: v.detach().float().reshape(-1, v.shape[-1])
                    for k, v in _read_vectors(data).items()
                }
            except Exception as exc:  # noqa: BLE001 - a bad file is skipped and logged, not fatal
                log.warning("skipping embedding %s: %s", path.name, exc)
                catalog.skipped[name] = str(exc)
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            embedding = Embedding(name, path, digest, vectors, _trained(data))
            if not name.strip():
                # A name of only whitespace tokenizes to nothing and would match before every
                # token of every prompt; webui fails to register such a file and skips it.
                catalog.skipped[name] = "the file name has no text to write in a prompt"
                catalog.unusable[name] = embedding
                continue
            if max(int(v.shape[0]) for v in vectors.values()) > MAX_VECTORS:
                catalog.skipped[name] = f"more than {MAX_VECTORS} vectors"
                catalog.unusable[name] = embedding
                continue
            catalog.items[name] = embedding
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

    def listing(self, expected_shape: int | None = None) -> dict[str, Any]:
        """webui's `GET /sdapi/v1/embeddings` (`EmbeddingsResponse`) for a checkpoint whose
        text encoders are `expected_shape` wide in all (None: every usable one is loaded).

        As webui: "loaded" are the embeddings of that width, sorted by name ignoring case;
        "skipped" the others. Files we cannot use are skipped too; files that cannot be read
        at all are not listed (webui cannot list them either; the setup log names them)."""
        loaded: dict[str, Any] = {}
        skipped: dict[str, Any] = {}
        for name, item in self.items.items():
            fits = expected_shape is None or item.shape == expected_shape
            (loaded if fits else skipped)[name] = item.listing()
        for name, item in self.unusable.items():
            skipped[name] = item.listing()
        return {
            "loaded": dict(sorted(loaded.items(), key=lambda kv: kv[0].lower())),
            "skipped": skipped,
        }
