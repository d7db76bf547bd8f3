"""What webui's text encoding adds to the infotext: "TI hashes" and "Emphasis", in its order.

webui 1.10.1 records both in `model_hijack.extra_generation_params` during each forward of a
text-encoder wrapper (sd_hijack_clip.py, TextConditionalModel.forward), and processing copies
them into `p.extra_generation_params` once the first batch's conditioning is computed
(process_images_inner, right after `p.setup_conds()`). So:

- There is one forward per distinct prompt (prompt_parser.get_learned_conditioning caches by
  text): the distinct negative prompts first (setup_conds computes `uc` before `c`), then the
  distinct AND parts of the prompts (get_multicond_prompt_list), each with its schedule's texts
  (prompt editing resolved). SDXL runs each of its two wrappers on every forward; the
  refiner and SD1/SD2 have one.
- Per forward: "TI hashes" becomes that forward's embeddings (`name: hash`, the name without
  ':' and ',') followed by the value so far (so a name used twice is printed twice); then
  "Emphasis" when one of its texts has '(' or '[' and the option is not "Original".
- The hires pass and the refiner encode later, during sampling, after that copy: they add
  nothing to the first batch's infotext. This server prints the first batch's for every image
  (webui's later batches also carry what their own encodings and the hires pass added).

Computed from the prompts before any model work (the tokenizers and the embedding files' names
are all it needs), so nothing flows back from text encoding into the infotext.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .infotext import remove_symbols
from .prompt_parser import get_learned_conditioning_prompt_schedules, split_and

# (texts) -> the (name, hash) pairs of the embeddings a forward over them uses, in webui's order.
EmbeddingsIn = Callable[[Sequence[str]], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class Forward:
    """One forward of webui's text-encoder wrapper: one prompt's schedule texts."""

    texts: tuple[str, ...]
    embeddings: tuple[tuple[str, str], ...]  # (name, 12-hex hash), first use first


def forward_texts(
    prompts: Sequence[str], negatives: Sequence[str], steps: int
) -> list[tuple[str, ...]]:
    """The texts of each forward, in webui's order: distinct negatives, then distinct AND parts."""
    parts = [text for prompt in prompts for text, _ in split_and(prompt)]
    distinct = [*dict.fromkeys(negatives)], [*dict.fromkeys(parts)]
    forwards: list[tuple[str, ...]] = []
    for group in distinct:
        for schedule in get_learned_conditioning_prompt_schedules(group, steps):
            forwards.append(tuple(text for _, text in schedule))
    return forwards


def forwards_of(
    prompts: Sequence[str], negatives: Sequence[str], steps: int, embeddings_in: EmbeddingsIn
) -> list[Forward]:
    return [
        Forward(texts, tuple(embeddings_in(texts)))
        for texts in forward_texts(prompts, negatives, steps)
    ]


def encoding_infotext(forwards: Sequence[Forward], emphasis: str, wrappers: int) -> dict[str, str]:
    """The keys webui's forwards leave, in their insertion order (see the module docstring)."""
    params: dict[str, str] = {}
    for forward in forwards:
        for _ in range(wrappers):
            hashes = [
                f"{remove_symbols(name)}: {digest}" for name, digest in forward.embeddings if digest
            ]
            if hashes:
                if params.get("TI hashes"):
                    hashes.append(params["TI hashes"])
                params["TI hashes"] = ", ".join(hashes)
            if emphasis != "Original" and any("(" in t or "[" in t for t in forward.texts):
                params["Emphasis"] = emphasis
    return params
