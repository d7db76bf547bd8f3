"""webui seed semantics and the initial noise.

webui draws each image's noise from its own generator seeded with that image's seed, in
float32, shape (C, H/8, W/8), then stacks them (reference §6). So an image's seed, not its
position in the batch, decides its noise, and the same per-image generators go on to supply
the ancestral/SDE noise of later steps.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

# webui: random.randrange(4294967294) for -1/None.
SEED_RANGE = 4294967294
_system_random = random.SystemRandom()


def fix_seed(seed: int | None) -> int:
    """-1 or None → a fresh random seed (not from any global RNG state that a request could
    have touched); anything else as is."""
    if seed is None or seed == -1:
        return _system_random.randrange(SEED_RANGE)
    return int(seed)


def image_seeds(first: int, count: int) -> list[int]:
    """all_seeds: image i gets seed + i."""
    return [first + i for i in range(count)]


def make_generators(seeds: Sequence[int], device: str) -> list[torch.Generator]:
    """One generator per image, seeded with the image's seed (webui's ImageRNG)."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def initial_noise(
    generators: Sequence[torch.Generator], channels: int, height: int, width: int
) -> torch.Tensor:
    """Stacked float32 noise, one draw per image from its own generator.

    Drawn in float32 on the generator's device: drawing in fp16 would give other numbers
    (reference §6, requirement 1). The caller casts to the model dtype."""
    shape = (channels, height // 8, width // 8)
    draws = [
        torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators
    ]
    return torch.stack(draws)
