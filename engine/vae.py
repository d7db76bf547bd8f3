"""VAEs from vae/, chosen per request with override_settings.sd_vae, as webui names them.

"Automatic": a vae/ file whose name starts with the checkpoint's name (webui's
find_vae_near_checkpoint), else the checkpoint's own VAE. "None": the checkpoint's own VAE.
Anything else must be a file name from the listing. A chosen VAE is loaded once per model
family (the SD1 and SDXL latent scaling factors differ; the weights are shared by name) and is
only ever passed to encode/decode calls: the checkpoint's own VAE is never replaced. Loaded
files count against SD_DEVICE_MEMORY (engine/working_set.py): an idle one waits in host memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import HashCache
from .errors import ModelLoadError, UnknownName
from .loading import CONFIG_ROOT, Family, LoadedCheckpoint, Placement, infer_vae, read_shapes
from .oom import is_out_of_memory, reported
from .working_set import module_entry

log = logging.getLogger(__name__)

AUTOMATIC = "Automatic"
NONE = "None"


@dataclass(frozen=True)
class VaeFile:
    name: str  # file name with extension, webui's key ("vae-ft-mse-840000-ema-pruned.safetensors")
    path: Path
    shorthash: str  # sha256[:10] (infotext "VAE hash")

    @property
    def name_for_infotext(self) -> str:
        return self.path.stem  # webui prints the name without extension ("VAE: ...")


@dataclass(frozen=True)
class VaeChoice:
    """The VAE a request uses: None file means the checkpoint's own."""

    file: VaeFile | None
    vae: Any


@dataclass
class VaeCatalog:
    files: dict[str, VaeFile]
    placement: Placement
    cache_root: Path
    _loaded: dict[tuple[str, Family], Any] = field(default_factory=dict)

    @classmethod
    def scan(
        cls,
        paths: Iterable[Path],
        placement: Placement,
        cache_root: Path,
        hashes: HashCache | None = None,
    ) -> VaeCatalog:
        files = {}
        for path in paths:
            digest = (hashes or HashCache(None)).sha256(path)
            files[path.name] = VaeFile(path.name, path, digest[:10])
        return cls(files, placement, cache_root)

    def keep_loaded(self, previous: VaeCatalog) -> None:
        """Reuse `previous`'s loaded modules for files that did not change (a rescan)."""
        for (name, family), module in previous._loaded.items():
            if self.files.get(name) == previous.files.get(name):
                self._loaded[(name, family)] = module

    def listing(self) -> list[dict[str, Any]]:
        """webui GET /sdapi/v1/sd-vae."""
        return [{"model_name": f.name, "filename": str(f.path)} for f in self.files.values()]

    def choose(
        self, setting: str, loaded: LoadedCheckpoint, *, field: str = "override_settings.sd_vae"
    ) -> VaeChoice:
        """Resolve sd_vae for this checkpoint (names only; a request never names a path)."""
        file: VaeFile | None
        if setting == NONE:
            file = None
        elif setting == AUTOMATIC:
            stem = loaded.info.name_for_extra
            file = next((f for f in self.files.values() if f.path.name.startswith(stem)), None)
        elif setting in self.files:
            file = self.files[setting]
        else:
            raise UnknownName(field, setting, [AUTOMATIC, NONE, *self.files], kind="VAE")
        if file is None:
            return VaeChoice(None, loaded.pipe.vae)
        return VaeChoice(file, self._load(file, loaded.family, loaded.info.title))

    def _load(self, file: VaeFile, family: Family, loaded_title: str) -> Any:
        key = (file.name, family)
        memory = self.placement.memory
        if key not in self._loaded:
            if memory is not None:
                memory.before_load(file.path.stat().st_size, beside=[loaded_title])
            with reported(
                f"loading VAE {file.name}", "try again, or use the checkpoint's own VAE (None)"
            ):
                self._loaded[key] = load_vae_file(
                    file.path, family, self.placement, self.cache_root
                )
        if memory is not None:  # on the device for this request (engine/working_set.py)
            name = f"{file.name} [{file.shorthash}] ({family.value})"
            memory.use(module_entry("vae", name, self._loaded[key]), beside=[loaded_title])
        return self._loaded[key]


def load_vae_file(path: Path, family: Family, placement: Placement, cache_root: Path) -> Any:
    """A standalone VAE in the original layout, with the family's reference config."""
    from diffusers import AutoencoderKL

    base = json.loads((CONFIG_ROOT / family.value / "vae" / "config.json").read_text())
    shapes = read_shapes(path)
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in shapes) else ""
    config = infer_vae(base, shapes, prefix, path.name)
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root / "vae-configs" / f"{family.value}-{digest}"
    if not (folder / "vae" / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "vae").mkdir(parents=True)
        (folder / "vae" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    try:
        vae = AutoencoderKL.from_single_file(
            str(path),
            config=str(folder),
            subfolder="vae",
            local_files_only=True,
            torch_dtype=placement.dtype,
        )
    except Exception as exc:
        if is_out_of_memory(exc):
            raise  # reported by the caller (engine/oom.py), not blamed on the file
        raise ModelLoadError(
            f"{path.name}: VAE loading failed ({type(exc).__name__}: {exc})"
        ) from exc
    # The same precision policy as a checkpoint's own VAE (engine/vae_precision.py).
    from .vae_precision import settle_precision

    return settle_precision(vae.to(placement.device).eval(), family, placement, path.name)
