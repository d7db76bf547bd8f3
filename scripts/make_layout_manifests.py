"""Write the key-layout manifests of real single-file checkpoints (keys and shapes, no weights).

    python scripts/make_layout_manifests.py TOOLKIT_DIR [--cross-check SD_MECHA_DIR] [--out DIR]

The manifests in tests/data/layouts/ let the loader tests run config inference on the exact key
names and shapes of the files users download, without shipping gigabytes. They are built from
PUBLISHED listings, never from this project's tiny-model maker:

* Source (keys and shapes): arenasys/stable-diffusion-webui-model-toolkit, commit
  e19dd46e61f04436832b258f7ae6adfc72bca346: ``components/*.txt`` lists every tensor of each
  component of the original checkpoints ("key [shape]", taken by the toolkit's author from the
  released files), and ``toolkit.py`` names each component's key prefix (``COMPONENTS``:
  UNET-v1-SD and UNET-XL-* under ``model.diffusion_model.``, UNET-v1-EMA under
  ``model_ema.diffusion_model`` with LitEma's dot-less names, CLIP-v1-SD under
  ``cond_stage_model.transformer.text_model.``, CLIP-v1-NAI -- the legacy SD1 layout old
  fine-tunes have -- under ``cond_stage_model.transformer.``, CLIP-v2-SD under
  ``cond_stage_model.model.``, CLIP-XL-AUX-SD under ``conditioner.embedders.0.transformer.
  text_model.``, CLIP-XL-SD under ``conditioner.embedders.1.model.``, CLIP-XL-Refiner under
  ``conditioner.embedders.0.model.``, VAE-v1-SD under ``first_stage_model.``) and the buffers an
  LDM file may carry (``OPTIONAL``: ``alphas_cumprod`` and friends, shape [1000];
  ``model_ema.decay`` and ``model_ema.num_updates``, scalars).
* Which file carries which part is the LDM/SGM rule: CompVis ``LatentDiffusion`` (SD 1.x, SD 2.x)
  registers the 12 noise-schedule buffers of ``DDPM.register_schedule`` and, while training, a
  ``LitEma`` (``model_ema.*``); "pruned" files keep the EMA copy, "emaonly" / "ema-pruned" files
  hold the EMA weights under ``model.*`` and no ``model_ema.*``. SGM's ``DiffusionEngine`` (SDXL)
  registers no schedule buffers, so SDXL files have none.
* SD 2.1 512-base and 768-v share one layout (v2-inference.yaml and v2-inference-v.yaml differ in
  ``parameterization`` only), so one manifest stands for both; the prediction type comes from the
  same-name .yaml (or webui's weight probe), never from keys.
* Cross-check (``--cross-check``): ljleb/sd-mecha, commit b8d4d88131604d2c2b684d016d104abeaf13f8fb,
  ``sd_mecha/extensions/builtin/model_configs/sd1-ldm.yaml`` and ``sdxl-sgm.yaml`` (written by
  its ``scripts/yaml_from_safetensors.py`` from real files) are an independent listing: every
  manifest key must be there (as a key or one of its ``aliases``) with the same shape, and every
  key it does not mark optional must be in the manifest. SD 2.x and the refiner have no second
  listing there; for every manifest, tests/test_loading.py also runs diffusers' own single-file
  converter on it and finds exactly the parameters and shapes of the reference diffusers models.

Output: ``<name>.json.gz``: ``{"file": ..., "sources": [...], "tensors": {key: shape}}``, written
with a zero gzip mtime so the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Shape = list[int]
Layout = dict[str, Shape]

TOOLKIT = "arenasys/stable-diffusion-webui-model-toolkit@e19dd46e61f04436832b258f7ae6adfc72bca346"
MECHA = "ljleb/sd-mecha@b8d4d88131604d2c2b684d016d104abeaf13f8fb"

# toolkit.py COMPONENTS: component -> (listing file, key prefix)
PREFIXES: dict[str, tuple[str, str]] = {
    "UNET-v1-SD": ("UNET-v1-SD.txt", "model.diffusion_model."),
    "UNET-v1-EMA": ("UNET-v1-EMA.txt", "model_ema.diffusion_model"),
    "UNET-v2-SD": ("UNET-v2-SD.txt", "model.diffusion_model."),
    "UNET-XL-SD": ("UNET-XL-SD.txt", "model.diffusion_model."),
    "UNET-XL-Refiner": ("UNET-XL-Refiner.txt", "model.diffusion_model."),
    "VAE-v1-SD": ("VAE-v1-SD.txt", "first_stage_model."),
    "CLIP-v1-SD": ("CLIP-v1-SD.txt", "cond_stage_model.transformer.text_model."),
    "CLIP-v1-NAI": ("CLIP-v1-SD.txt", "cond_stage_model.transformer."),
    "CLIP-v2-SD": ("CLIP-v2-SD.txt", "cond_stage_model.model."),
    "CLIP-XL-AUX-SD": ("CLIP-v1-SD.txt", "conditioner.embedders.0.transformer.text_model."),
    "CLIP-XL-SD": ("CLIP-XL-SD.txt", "conditioner.embedders.1.model."),
    "CLIP-XL-Refiner": ("CLIP-XL-SD.txt", "conditioner.embedders.0.model."),
}

# toolkit.py OPTIONAL, split by what registers them (logvar, also listed there, is a training
# parameter of SGM/LDM configs with learn_logvar and is in none of these files).
LDM_SCHEDULE_BUFFERS: dict[str, Shape] = {
    name: [1000]
    for name in (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )
}
EMA_COUNTERS: dict[str, Shape] = {"model_ema.decay": [], "model_ema.num_updates": []}

# manifest name -> (the released file it describes, its components, extra tensors)
MANIFESTS: dict[str, tuple[str, tuple[str, ...], tuple[Mapping[str, Shape], ...]]] = {
    "sd15-pruned": (
        "v1-5-pruned.safetensors (runwayml/stable-diffusion-v1-5)",
        ("UNET-v1-SD", "UNET-v1-EMA", "VAE-v1-SD", "CLIP-v1-SD"),
        (LDM_SCHEDULE_BUFFERS, EMA_COUNTERS),
    ),
    "sd15-emaonly": (
        "v1-5-pruned-emaonly.safetensors (runwayml/stable-diffusion-v1-5)",
        ("UNET-v1-SD", "VAE-v1-SD", "CLIP-v1-SD"),
        (LDM_SCHEDULE_BUFFERS,),
    ),
    "sd15-legacy-text-encoder": (
        "an SD 1.x fine-tune with the old text-encoder keys (no text_model.): CLIP-v1-NAI",
        ("UNET-v1-SD", "VAE-v1-SD", "CLIP-v1-NAI"),
        (LDM_SCHEDULE_BUFFERS,),
    ),
    "sd21": (
        "v2-1_512-ema-pruned.safetensors and v2-1_768-ema-pruned.safetensors (one layout)",
        ("UNET-v2-SD", "VAE-v1-SD", "CLIP-v2-SD"),
        (LDM_SCHEDULE_BUFFERS,),
    ),
    "sdxl-base": (
        "sd_xl_base_1.0.safetensors (stabilityai/stable-diffusion-xl-base-1.0)",
        ("UNET-XL-SD", "VAE-v1-SD", "CLIP-XL-AUX-SD", "CLIP-XL-SD"),
        (),
    ),
    "sdxl-refiner": (
        "sd_xl_refiner_1.0.safetensors (stabilityai/stable-diffusion-xl-refiner-1.0)",
        ("UNET-XL-Refiner", "VAE-v1-SD", "CLIP-XL-Refiner"),
        (),
    ),
}

# manifest -> sd-mecha config that lists the same architecture
CROSS_CHECKS = {
    "sd15-pruned": "sd1-ldm.yaml",
    "sd15-emaonly": "sd1-ldm.yaml",
    "sd15-legacy-text-encoder": "sd1-ldm.yaml",
    "sdxl-base": "sdxl-sgm.yaml",
}


def read_listing(path: Path) -> Layout:
    """One toolkit components/*.txt file: ``key [d0,d1,...]`` per line."""
    layout: Layout = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        key, shape = line.rsplit(" ", 1)
        layout[key] = [int(d) for d in shape.strip("[]").split(",") if d]
    return layout


def build(
    toolkit: Path, components: Iterable[str], extras: Iterable[Mapping[str, Shape]]
) -> Layout:
    tensors: Layout = {}
    for component in components:
        listing, prefix = PREFIXES[component]
        for key, shape in read_listing(toolkit / "components" / listing).items():
            tensors[prefix + key] = shape
    for extra in extras:
        tensors.update(extra)
    return dict(sorted(tensors.items()))


def cross_check(tensors: Layout, mecha_yaml: Path) -> list[str]:
    """Differences between a manifest and sd-mecha's listing of the same architecture."""
    import yaml

    config: dict[str, Any] = yaml.safe_load(mecha_yaml.read_text(encoding="utf-8"))
    known: dict[str, Shape] = {}
    required: set[str] = set()
    names: dict[str, str] = {}  # alias -> key
    for component in config["components"].values():
        for key, meta in component.items():
            known[key] = list(meta["shape"])
            names[key] = key
            for alias in meta.get("aliases", []):
                known[alias] = list(meta["shape"])
                names[alias] = key
            if not meta.get("optional", False):
                required.add(key)
    problems = [
        f"{key}: {shape} here, {known.get(key)} in {mecha_yaml.name}"
        for key, shape in tensors.items()
        if known.get(key) != shape
    ]
    present = {names[k] for k in tensors if k in names}
    problems += [
        f"{key}: required by {mecha_yaml.name}, missing here" for key in sorted(required - present)
    ]
    return problems


def write_manifest(path: Path, file: str, tensors: Layout, sources: list[str]) -> None:
    data = json.dumps({"file": file, "sources": sources, "tensors": tensors}, indent=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(data.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("toolkit", type=Path, help="checkout of the model-toolkit (components/)")
    parser.add_argument("--cross-check", type=Path, help="sd-mecha model_configs folder")
    parser.add_argument("--out", type=Path, default=Path("tests/data/layouts"))
    args = parser.parse_args(argv)
    failed = False
    for name, (file, components, extras) in MANIFESTS.items():
        tensors = build(args.toolkit, components, extras)
        sources = [f"{TOOLKIT} components {', '.join(components)}"]
        if args.cross_check is not None and name in CROSS_CHECKS:
            problems = cross_check(tensors, args.cross_check / CROSS_CHECKS[name])
            status = "agrees" if not problems else f"{len(problems)} differences"
            print(f"{name}: cross-check with {MECHA} {CROSS_CHECKS[name]}: {status}")
            for problem in problems[:20]:
                print(f"    {problem}")
            failed |= bool(problems)
            sources.append(f"cross-checked: {MECHA} {CROSS_CHECKS[name]}")
        path = args.out / f"{name}.json.gz"
        write_manifest(path, file, tensors, sources)
        print(f"{len(tensors):6d} tensors  {path.stat().st_size / 1e3:6.1f} kB  {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
