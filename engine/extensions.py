"""The extension contract: what an `alwayson_scripts` extension receives and what it may return.

webui runs always-on scripts by patching shared modules for the length of a request. Here an
extension never touches the shared models: `prepare` returns `Effects` (sampler hooks,
infotext entries, extra images) that the engine applies to one request only. Everything that
can fail (arguments, images, model lookups) fails in `parse_args`/`prepare`, before sampling.
The one sanctioned exception is a `ScopedUNetHook` (engine/sampling.py; ControlNet's reference
modules): the engine enters its `attached(unet)` around one pass, and it must undo every
change to the UNet on exit, errors and cancel included.

Extensions live in packages under `extensions/`; each exposes `EXTENSION`, a class whose
instances have the `Extension` protocol. `ExtensionRegistry.discover()` imports the packages
once per process (classes hold no state) and makes new instances for every call, so each
Engine owns its extensions: a second engine in the process never touches the first one's
ControlNet list or model cache.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .errors import ModelLoadError, Problem, RequestError, UnknownName

if TYPE_CHECKING:
    from PIL import Image

    from .catalog import Catalog
    from .loading import LoadedCheckpoint, Placement
    from .sampling import CFGHook, UNetHook


@dataclass(frozen=True)
class GenerationContext:
    """What an extension may know about the request (read-only)."""

    mode: Literal["txt2img", "img2img"]
    loaded: LoadedCheckpoint  # .family, .pipe (unet dtype/device), .info
    width: int  # first-pass processing size
    height: int
    batch_size: int
    steps: int
    init_images: tuple[Image.Image, ...] = ()  # img2img originals (decoded); () for txt2img
    init_mask: Image.Image | None = None  # img2img's mask as sent (decoded, "L")
    resize_mode: int = 0  # img2img resize_mode (0 for txt2img)
    request: Any = None  # the parsed request (read-only): its field values by webui name


# A decoded picture -> the picture to return (ControlNet inpaint_only's final composite).
ImageHook = Callable[["Image.Image"], "Image.Image"]


@dataclass
class Effects:
    """What an extension returns; the engine applies it to one request only.

    `unet_hooks` run at every step of the first pass; `hires_unet_hooks` at every step of the
    hires pass (a ScopedUNetHook among them is attached to the pass's UNet around the pass).
    `infotext` entries join extra_generation_params (raw values; the engine quotes) where a
    webui extension's `process` hook adds them (before webui's hires/img2img keys);
    `batch_infotext` where a `before_process_batch` hook does (after those keys).
    `extra_images` are appended after the generated images (ControlNet's detected maps);
    `warnings` say what a request asked for that was changed or ignored."""

    unet_hooks: list[UNetHook] = field(default_factory=list)
    hires_unet_hooks: list[UNetHook] = field(default_factory=list)
    cfg_hooks: list[CFGHook] = field(default_factory=list)
    infotext: dict[str, Any] = field(default_factory=dict)
    batch_infotext: dict[str, Any] = field(default_factory=dict)
    extra_images: list[Image.Image] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # joins info.warnings
    image_hooks: list[ImageHook] = field(default_factory=list)  # on each decoded picture

    def merge(self, other: Effects) -> Effects:
        """Both effects, this one's first (several extensions in one request)."""
        return Effects(
            unet_hooks=[*self.unet_hooks, *other.unet_hooks],
            hires_unet_hooks=[*self.hires_unet_hooks, *other.hires_unet_hooks],
            cfg_hooks=[*self.cfg_hooks, *other.cfg_hooks],
            infotext={**self.infotext, **other.infotext},
            batch_infotext={**self.batch_infotext, **other.batch_infotext},
            extra_images=[*self.extra_images, *other.extra_images],
            warnings=[*self.warnings, *other.warnings],
            image_hooks=[*self.image_hooks, *other.image_hooks],
        )


Listing = Callable[[], Any]


@runtime_checkable
class Extension(Protocol):
    """One always-on script, addressed by its webui title in `alwayson_scripts`."""

    title: str

    def setup(self, catalog: Catalog, placement: Placement) -> None:
        """Scan/load what the extension needs (called once at engine setup)."""

    def parse_args(self, value: Any, *, field: str) -> Any:
        """webui's `{"args": [...]}` value -> a typed, validated args object (RequestError
        listing every problem, with paths under `field`)."""

    def prepare(self, ctx: GenerationContext, args: Any) -> Effects:
        """Everything request-specific that can fail, before sampling; no shared mutation."""

    def listings(self) -> Mapping[str, Listing]:
        """Extra listing endpoints, e.g. {"controlnet/model_list": ...}."""


def script_args(value: Any, *, field: str) -> list[Any]:
    """The positional args of an alwayson_scripts entry.

    webui reads `{"args": [...]}`; clients also send the list itself, or a single dict (one
    ControlNet unit). An empty entry, `{}`, has no args: webui (modules/api/api.py
    init_script_args) reads an entry's args only when the key is there, so the script keeps
    its defaults and does nothing. Anything else is an error naming the field."""
    if isinstance(value, Mapping):
        if "args" in value:
            args = value["args"]
            if isinstance(args, list | tuple):
                return list(args)
            raise RequestError.single(f"{field}.args", args, "expected a list of arguments")
        # Not [{}]: that would be one unit of defaults, refused for a model never sent.
        return [dict(value)] if value else []
    if isinstance(value, list | tuple):
        return list(value)
    raise RequestError.single(field, value, 'expected {"args": [...]}')


ExtensionClass = Callable[[], Extension]


def discover_classes(package: str = "extensions") -> tuple[ExtensionClass, ...]:
    """The EXTENSION class of every subpackage of `package`, by package name.

    An import failure is a setup failure (ModelLoadError naming the extension): a server that
    silently lacks ControlNet would return plain images for ControlNet requests."""
    root = importlib.import_module(package)
    found: list[ExtensionClass] = []
    for info in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        name = f"{package}.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise ModelLoadError(
                f"extension {info.name!r} ({name}) failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        cls = getattr(module, "EXTENSION", None)
        if cls is None:
            continue
        if not isinstance(cls, type):
            # An instance here would be shared by every engine of the process.
            raise ModelLoadError(f"extension {info.name!r}: EXTENSION must be a class")
        found.append(cls)
    return tuple(found)


class ExtensionRegistry:
    """One engine's extensions (its own instances), by title."""

    def __init__(self, extensions: list[Extension]):
        self.extensions = list(extensions)

    @classmethod
    def discover(cls, package: str = "extensions") -> ExtensionRegistry:
        """New instances of webui's built-in always-on scripts and of every extension class
        under `package` (not set up yet)."""
        from .builtin_scripts import BUILTIN_FACTORIES  # it builds on this module

        instances: list[Extension] = []
        for factory in (*BUILTIN_FACTORIES, *discover_classes(package)):
            extension = factory()
            if not isinstance(extension, Extension):
                raise ModelLoadError(f"extension {factory!r}: instances lack the contract")
            instances.append(extension)
        return cls(instances)

    @property
    def titles(self) -> list[str]:
        return [e.title for e in self.extensions]

    def setup(self, catalog: Catalog, placement: Placement) -> None:
        """Set every extension up (scan model folders, ...)."""
        for extension in self.extensions:
            extension.setup(catalog, placement)

    def resolve(self, name: str, *, field: str) -> Extension:
        """The extension titled `name`, compared case-insensitively (as webui's API does)."""
        wanted = str(name).strip().lower()
        for extension in self.extensions:
            if extension.title.lower() == wanted:
                return extension
        raise UnknownName(field, name, self.titles, kind="alwayson script")

    def parse(self, alwayson_scripts: Mapping[str, Any]) -> list[tuple[Extension, Any]]:
        """Every named extension with its parsed args; all problems reported at once."""
        parsed: list[tuple[Extension, Any]] = []
        errors: list[RequestError] = []
        duplicates = self.duplicate_keys(alwayson_scripts)
        if duplicates:
            errors.append(RequestError(duplicates))
        for name, value in alwayson_scripts.items():
            field_name = f"alwayson_scripts.{name}"
            try:
                extension = self.resolve(name, field=field_name)
                parsed.append((extension, extension.parse_args(value, field=field_name)))
            except RequestError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]  # keeps its class (UnknownName)
        if errors:
            raise RequestError([p for err in errors for p in err.problems])
        return parsed

    def duplicate_keys(self, alwayson_scripts: Mapping[str, Any]) -> list[Problem]:
        """One problem per extension named by more than one key.

        Names match case-insensitively, so `controlnet` and ` ControlNet ` are one extension;
        running both would double its effect (and its unit count) behind one infotext entry.
        webui keeps the last key's args; we refuse rather than guess which one was meant."""
        keys: dict[str, list[str]] = {}
        for name in alwayson_scripts:
            keys.setdefault(str(name).strip().lower(), []).append(str(name))
        titles = {e.title.lower(): e.title for e in self.extensions}
        return [
            Problem(
                "alwayson_scripts",
                names,
                f"these keys all name the extension {titles.get(key, names[0].strip())!r} "
                "(names match case-insensitively); send it once",
            )
            for key, names in keys.items()
            if len(names) > 1
        ]

    def listings(self) -> dict[str, Listing]:
        """Every extension's extra listing endpoints."""
        result: dict[str, Listing] = {}
        for extension in self.extensions:
            result.update(extension.listings())
        return result
