"""webui seed semantics and noise (reference §6; webui modules/rng.py).

Each image's noise comes from its own generator seeded with that image's seed, in float32,
shape (C, H/8, W/8); the images are then stacked. So an image's seed, not its position in the
batch, decides its noise. The same per-image generators go on to supply the sampler's later
noise (ancestral / SDE steps), unless ENSD re-seeds them with seed + delta after the first draw.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# webui: random.randrange(4294967294) for -1/None.
SEED_RANGE = 4294967294
_system_random = random.SystemRandom()


def fix_seed(seed: int | None) -> int:
    """-1 or None → a fresh random seed (not from a global RNG a request could have touched);
    anything else as is."""
    if seed is None or seed == -1:
        return _system_random.randrange(SEED_RANGE)
    return int(seed)


def image_seeds(first: int, count: int) -> list[int]:
    """all_seeds: image i gets seed + i."""
    return [first + i for i in range(count)]


def request_seeds(
    seed: int, subseed: int, strength: float, count: int
) -> tuple[list[int], list[int]]:
    """(all_seeds, all_subseeds) as webui: with a variation strength every image shares the
    seed and the subseeds count up; without one the seeds count up (subseeds too, unused)."""
    subseeds = image_seeds(subseed, count)
    if strength != 0:
        return [seed] * count, subseeds
    return image_seeds(seed, count), subseeds


def make_generators(seeds: Sequence[int], device: str) -> list[torch.Generator]:
    """One generator per image, seeded with the image's seed (webui's ImageRNG)."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """webui's slerp between two noises (normalised along dim 1, as webui does on (C, H, W)).
    Nearly parallel vectors fall back to webui's (swapped-weight) lerp."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (
        torch.sin(val * omega) / so
    ).unsqueeze(1) * high


@dataclass(frozen=True)
class NoiseSpec:
    """Everything that decides a batch's noise."""

    seeds: Sequence[int]
    subseeds: Sequence[int] = ()
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (h, w) in pixels; both > 0 to apply
    ensd: int = 0
    device: str = "cpu"


def _paste_centred(target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """webui's seed resize: the small-size noise centred into (or cropped from) the full one."""
    dx = (target.shape[2] - noise.shape[2]) // 2
    dy = (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return target


def first_noise(
    spec: NoiseSpec, channels: int, height: int, width: int
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The batch's initial noise and the generators for the sampler's later noise.

    Drawn in float32 on the generator's device: drawing in fp16 gives other numbers
    (reference §6, requirement 1). The caller casts to the model dtype."""
    shape = (channels, height // 8, width // 8)
    resize = spec.seed_resize_from
    noise_shape = shape
    if resize is not None and resize[0] > 0 and resize[1] > 0:
        noise_shape = (channels, resize[0] // 8, resize[1] // 8)
    generators = make_generators(spec.seeds, spec.device)
    draws = []
    for i, (seed, generator) in enumerate(zip(spec.seeds, generators, strict=True)):
        subnoise = None
        if spec.subseed_strength != 0 and spec.subseeds:
            subseed = spec.subseeds[i] if i < len(spec.subseeds) else 0
            subnoise = _randn(noise_shape, make_generators([subseed], spec.device)[0])
        if noise_shape != shape:
            noise = _randn(noise_shape, make_generators([seed], spec.device)[0])
        else:
            noise = _randn(shape, generator)
        if subnoise is not None:
            noise = slerp(spec.subseed_strength, noise, subnoise)
        if noise_shape != shape:
            noise = _paste_centred(_randn(shape, generator), noise)
        draws.append(noise)
    if spec.ensd:
        # webui re-seeds the per-image generators with seed + ENSD after the first noise.
        generators = make_generators([s + spec.ensd for s in spec.seeds], spec.device)
    return torch.stack(draws), generators


def initial_noise(
    generators: Sequence[torch.Generator], channels: int, height: int, width: int
) -> torch.Tensor:
    """Stacked float32 noise, one draw per image from its own generator."""
    shape = (channels, height // 8, width // 8)
    return torch.stack([_randn(shape, g) for g in generators])
