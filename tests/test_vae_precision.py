"""One VAE precision policy (engine/vae_precision.py): the engine's dtype everywhere, fp32 for
an SDXL VAE that overflows in fp16, and a NaN half-precision decode retried in fp32 without
converting the shared module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loading import Family, Placement
from engine.sampling import decode_latents
from engine.vae import load_vae_file
from engine.vae_precision import decode_pixels

HALF = Placement("cpu", torch.float16)
FULL = Placement("cpu", torch.float32)
# conv_in x 1e5 pushes the decoder's first activations past fp16's maximum (65504): inf, then
# NaN after the first GroupNorm. In fp32 the norms absorb the scale and the picture is finite.
OVERFLOW = 1e5


def _overflowing_copy(source: Path, folder: Path, key: str) -> Path:
    state = load_file(str(source))
    state[key] = state[key] * OVERFLOW
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    save_file(state, str(target))
    return target


def _latents() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def test_sd1_vae_file_runs_in_the_engine_dtype(tiny_models_dir: Path, tmp_path: Path) -> None:
    vae = load_vae_file(
        tiny_models_dir / "vae" / "tiny-vae.safetensors", Family.SD1, HALF, tmp_path
    )
    assert vae.dtype == torch.float16


def test_sdxl_vae_stays_half_when_its_probe_is_finite_else_float32(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    checkpoint = tiny_models_dir / "checkpoints" / "tiny-sdxl.safetensors"
    fine = load_vae_file(checkpoint, Family.SDXL, HALF, tmp_path / "a")
    assert fine.dtype == torch.float16  # an "fp16-fix" VAE: stays half
    broken_file = _overflowing_copy(
        checkpoint, tmp_path / "broken", "first_stage_model.decoder.conv_in.weight"
    )
    broken = load_vae_file(broken_file, Family.SDXL, HALF, tmp_path / "b")
    assert broken.dtype == torch.float32  # like the original SDXL VAE: kept in fp32
    assert torch.isfinite(decode_pixels(broken, _latents())).all()


def test_nan_half_decode_is_retried_in_float32_and_the_module_is_untouched(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    source = _overflowing_copy(
        tiny_models_dir / "vae" / "tiny-vae.safetensors", tmp_path / "vae", "decoder.conv_in.weight"
    )
    half = load_vae_file(source, Family.SD1, HALF, tmp_path / "h")
    full = load_vae_file(source, Family.SD1, FULL, tmp_path / "f")
    latents = _latents()
    with torch.no_grad():
        raw = half.decode(latents.half() / half.config.scaling_factor).sample
        assert not torch.isfinite(raw).all()  # the failure is real in half precision
        retried = decode_pixels(half, latents)
        reference = full.decode(latents / full.config.scaling_factor).sample
    assert half.dtype == torch.float16  # the shared module was not converted
    # The retry runs the half weights in fp32 (as webui's upcast does): the fp32 file's picture
    # up to the weights' fp16 rounding (measured 1.8e-3 in the -1..1 range: under a level).
    torch.testing.assert_close(retried, reference, atol=4e-3, rtol=0)
    # Through the image path: pictures, not an error.
    with torch.no_grad():
        assert len(decode_latents(half, latents)) == 2


def test_a_nan_that_survives_the_retry_is_an_error(tiny_models_dir: Path, tmp_path: Path) -> None:
    from engine.errors import GenerationError

    vae = load_vae_file(
        tiny_models_dir / "vae" / "tiny-vae.safetensors", Family.SD1, HALF, tmp_path
    )
    latents = _latents()
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(GenerationError, match="NaN"), torch.no_grad():
        decode_latents(vae, latents)


# -- memory: per-image slicing (webui's decode_latent_batch) and tiling above a size ---------


def test_batch_decode_is_per_image_like_webui(tiny_models_dir: Path, tmp_path: Path) -> None:
    source = tiny_models_dir / "vae" / "tiny-vae.safetensors"
    vae = load_vae_file(source, Family.SD1, FULL, tmp_path)
    latents = _latents()
    with torch.no_grad():
        together = decode_pixels(vae, latents)
        alone = [decode_pixels(vae, latents[i : i + 1]) for i in range(2)]
    assert torch.equal(together, torch.cat(alone))  # no batch-mate changes an image


def test_large_images_are_tiled_small_ones_never(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.vae_precision as precision

    source = tiny_models_dir / "vae" / "tiny-vae.safetensors"
    vae = load_vae_file(source, Family.SD1, FULL, tmp_path)
    # 96x96 latents = 768x768 pixels: larger than the SD1 VAE's 512-pixel tile.
    big = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole = vae.decode(big / vae.config.scaling_factor).sample
        assert torch.equal(decode_pixels(vae, big), whole)  # under the default threshold
        monkeypatch.setattr(precision, "TILE_PIXELS", 512 * 512)
        tiled = decode_pixels(vae, big)
        small = _latents()[:1]
        assert torch.equal(decode_pixels(vae, small), vae.decode(small / 0.18215).sample)
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    seams = (tiled - whole).abs()
    # Tiles see less context than the whole image; the blended seams stay close (measured on
    # the tiny VAE: see the message) and the tiled path really ran (not identical).
    assert 0 < float(seams.mean()) < 0.05, f"mean {float(seams.mean()):.4f}"


def _big_decodes(
    tiny_models_dir: Path, tmp_path: Path
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiny SD1 VAE, a latent larger than its tile (96x96 = 768x768 pixels, the tile is
    512), and that latent's whole and tiled decodes."""
    vae = load_vae_file(
        tiny_models_dir / "vae" / "tiny-vae.safetensors", Family.SD1, FULL, tmp_path
    )
    big = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole = vae.decode(big / vae.config.scaling_factor).sample
        tiled = vae.tiled_decode(big / vae.config.scaling_factor).sample
    return vae, big, whole, tiled


def test_a_decode_that_runs_out_of_memory_is_retried_in_tiles(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae, big, whole, expected = _big_decodes(tiny_models_dir, tmp_path)
    with torch.no_grad():
        attempts: list[tuple[int, ...]] = []

        def out_of_memory(z: torch.Tensor, *args: object, **kwargs: object) -> object:
            attempts.append(tuple(z.shape))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

        monkeypatch.setattr(vae, "decode", out_of_memory)
        retried = decode_pixels(vae, big)
    assert attempts == [(1, 4, 96, 96)]  # the whole decode was tried once, then tiles
    assert torch.equal(retried, expected) and not torch.equal(retried, whole)


def test_tiling_follows_the_free_device_memory(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.vae_precision as precision

    vae, big, whole, tiled = _big_decodes(tiny_models_dir, tmp_path)
    needed = precision.decode_bytes(768 * 768, torch.float32)
    assert needed == 768 * 768 * precision.PEAK_ELEMENTS_PER_PIXEL * 4
    with torch.no_grad():
        monkeypatch.setattr(precision, "free_device_bytes", lambda device: needed)
        assert torch.equal(decode_pixels(vae, big), whole)  # fits: exactly the whole decode
        monkeypatch.setattr(precision, "free_device_bytes", lambda device: needed - 1)
        assert torch.equal(decode_pixels(vae, big), tiled)
