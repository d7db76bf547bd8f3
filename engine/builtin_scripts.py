"""webui's built-in always-on scripts, as its API treats them in `alwayson_scripts`.

Clients copy payloads from webui's payload display, which lists the built-in scripts next to
the extensions: `Seed`, `Sampler`, `Refiner`, `Comments`, `Hypertile`, `Extra options` and
(img2img) `Soft Inpainting`. webui 1.10's API accepts each of them, and:

- `Seed`, `Sampler`, `Refiner` are `ScriptBuiltinUI` scripts (modules/processing_scripts/):
  their `setup` copies the args onto the request, but `setup_for_ui_only = True` makes the API
  skip it (`setup_scrips(p, is_ui=not p.is_api)`). The request's own fields (`seed`, `steps`,
  `sampler_name`, `refiner_checkpoint`, ...) decide; the args do nothing.
- `Comments` and `Hypertile` take no args (they follow settings); `Extra options` takes one
  arg per setting in `extra_options_txt2img/img2img`, empty by default, so there are none.
- `Soft Inpainting` changes an inpainting result when enabled; it is not implemented here.
  It exists for img2img only: webui answers "not found" for it in txt2img.

So every one is accepted; args that webui would ignore and that disagree with the request are
listed in a warning (name, value, and the field that applies instead); Soft Inpainting enabled
is a warning that it did not run. Nothing here changes the picture, as in webui's API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from .errors import RequestError, show_value
from .extensions import Effects, GenerationContext, Listing

if TYPE_CHECKING:
    from .catalog import Catalog
    from .loading import Placement

BOTH: Final = frozenset({"txt2img", "img2img"})
_NONE_NAMES: Final = (None, "", "None")


def _truthy(value: Any) -> bool:
    # gradio checkbox values arrive as JSON bools; webui tests them with plain truthiness.
    return bool(value) and str(value).strip().lower() not in ("false", "0")


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


# What each UI-only script's setup would have set, from its args (None: leaves the field alone).


def _seed_fields(args: Mapping[str, Any]) -> dict[str, Any]:
    fields = {"seed": args["seed"]} if "seed" in args else {}
    extra = _truthy(args.get("extra"))
    if extra and _positive(args.get("subseed_strength")):
        fields["subseed"] = args.get("subseed")
        fields["subseed_strength"] = args["subseed_strength"]
    width, height = args.get("seed_resize_from_w"), args.get("seed_resize_from_h")
    if extra and _positive(width) and _positive(height):
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = width, height
    return fields


def _sampler_fields(args: Mapping[str, Any]) -> dict[str, Any]:
    fields = {name: args[name] for name in ("steps", "sampler_name", "scheduler") if name in args}
    if str(fields.get("scheduler", "")).strip().lower() == "automatic":
        fields["scheduler"] = None  # the UI's "Automatic" is the API's scheduler: null
    return fields


def _refiner_fields(args: Mapping[str, Any]) -> dict[str, Any]:
    if "enable" not in args and "checkpoint" not in args:
        return {}
    checkpoint = args.get("checkpoint")
    if not _truthy(args.get("enable")) or checkpoint in _NONE_NAMES:
        return {"refiner_checkpoint": None, "refiner_switch_at": None}
    return {"refiner_checkpoint": checkpoint, "refiner_switch_at": args.get("switch_at")}


@dataclass(frozen=True)
class BuiltinSpec:
    """One built-in script: its title, its positional args (webui's ui() order) and how the
    API treats them."""

    title: str
    args: tuple[str, ...] = ()
    ui_fields: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    why: str = ""
    modes: frozenset[str] = BOTH
    unsupported_when_enabled: bool = False


_UI_ONLY = "webui's API skips the setup of its built-in {title} script (setup_for_ui_only)"

SPECS: Final[tuple[BuiltinSpec, ...]] = (
    BuiltinSpec(
        "Seed",
        (
            "seed",
            "extra",
            "subseed",
            "subseed_strength",
            "seed_resize_from_w",
            "seed_resize_from_h",
        ),
        _seed_fields,
        _UI_ONLY.format(title="Seed"),
    ),
    BuiltinSpec(
        "Sampler",
        ("steps", "sampler_name", "scheduler"),
        _sampler_fields,
        _UI_ONLY.format(title="Sampler"),
    ),
    BuiltinSpec(
        "Refiner",
        ("enable", "checkpoint", "switch_at"),
        _refiner_fields,
        _UI_ONLY.format(title="Refiner"),
    ),
    BuiltinSpec("Comments", why="webui's Comments script takes no args"),
    BuiltinSpec(
        "Hypertile", why="webui's Hypertile script takes no args (it follows hypertile_* settings)"
    ),
    BuiltinSpec(
        "Extra options",
        why="webui's Extra options script has one arg per setting listed in "
        "extra_options_txt2img/img2img, none by default; send override_settings instead",
    ),
    BuiltinSpec(
        "Soft Inpainting",
        (
            "enabled",
            "mask_blend_power",
            "mask_blend_scale",
            "inpaint_detail_preservation",
            "composite_mask_influence",
            "composite_difference_threshold",
            "composite_difference_contrast",
        ),
        modes=frozenset({"img2img"}),
        unsupported_when_enabled=True,
    ),
)


@dataclass(frozen=True)
class BuiltinArgs:
    field: str
    values: tuple[Any, ...] = ()


def _same(sent: Any, used: Any) -> bool:
    if sent in _NONE_NAMES and used in _NONE_NAMES:
        return True
    if isinstance(sent, int | float) and isinstance(used, int | float):
        return float(sent) == float(used)
    return bool(sent == used)


class BuiltinScript:
    """The `Extension` contract for one of webui's built-in always-on scripts."""

    def __init__(self, spec: BuiltinSpec):
        self.spec = spec
        self.title = spec.title

    def setup(self, catalog: Catalog, placement: Placement) -> None:
        """Nothing to load."""

    def parse_args(self, value: Any, *, field: str) -> BuiltinArgs:
        """webui reads `{"args": [...]}` (or nothing); a bare list is accepted too."""
        if isinstance(value, Mapping):
            args = value.get("args", [])
            args = [] if args is None else args
        else:
            args = value
        if not isinstance(args, list | tuple):
            raise RequestError.single(
                f"{field}.args" if isinstance(value, Mapping) else field,
                args,
                'expected {"args": [...]}',
            )
        return BuiltinArgs(field, tuple(args))

    def prepare(self, ctx: GenerationContext, args: Any) -> Effects:
        """No effect on the picture; warnings for what the request asked and did not get."""
        assert isinstance(args, BuiltinArgs)
        spec = self.spec
        if ctx.mode not in spec.modes:
            raise RequestError.single(
                args.field,
                spec.title,
                f"webui's {spec.title} script exists for {'/'.join(sorted(spec.modes))} "
                f"only; it is not an always-on script of {ctx.mode}",
            )
        named = dict(zip(spec.args, args.values, strict=False))
        notes: list[str] = []
        extra = args.values[len(spec.args) :]
        if extra:
            notes.append(
                f"{args.field}.args: {len(extra)} arg(s) beyond the {len(spec.args)} that "
                f"{spec.title} takes were ignored ({spec.why or 'as webui does'})"
            )
        if spec.ui_fields is not None:
            differing = [
                f"{name}={show_value(value)} (the request's {name}="
                f"{show_value(getattr(ctx.request, name, None))} applies)"
                for name, value in spec.ui_fields(named).items()
                if not _same(value, getattr(ctx.request, name, None))
            ]
            if differing:
                notes.append(
                    f"{args.field}.args ignored as in webui's API ({spec.why}): "
                    + ", ".join(differing)
                )
        if spec.unsupported_when_enabled and named and _truthy(next(iter(named.values()))):
            shown = ", ".join(f"{k}={show_value(v)}" for k, v in named.items())
            notes.append(
                f"{args.field}: {spec.title} is not supported by this server; the request ran "
                f"without it ({shown})"
            )
        return Effects(warnings=notes)

    def listings(self) -> Mapping[str, Listing]:
        return {}


BUILTIN_FACTORIES: Final[tuple[Callable[[], BuiltinScript], ...]] = tuple(
    partial(BuiltinScript, spec) for spec in SPECS
)
