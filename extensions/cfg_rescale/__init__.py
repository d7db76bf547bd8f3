"""CFG rescale (Seshelle/CFG_Rescale_webui, "Common Diffusion Noise Schedules and Sample Steps
are Flawed" §3.4) through `alwayson_scripts`.

Title: "CFG Rescale Extension" (matched case-insensitively). Positional args, in the order of
the real script's `ui()`:

    args[0]  rescale   float 0..1, default 0   phi: how far the CFG result is pulled toward the
                                              std of the positive prediction (0 = off)
    args[1]  trailing  bool, default false    "DDIM Trailing": refused when true (it replaces
                                              DDIM's timestep schedule; not supported here)

A dict `{"rescale": ..., "trailing": ...}` in place of the list is accepted too. Infotext:
`CFG Rescale: <phi>` when phi > 0, as the extension writes it.

The real extension rescales per image against the std of the positive prediction over all of
its channels and pixels; with several AND parts its loop keeps only the last part's result, so
the last part is the reference here too (applied to the full AND sum).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from engine.catalog import Catalog
from engine.errors import Problem, RequestError
from engine.extensions import Effects, GenerationContext, Listing, script_args
from engine.loading import Placement
from engine.sampling import StepConditioning, StepInfo

_NAMES = ("rescale", "trailing")


@dataclass(frozen=True)
class RescaleArgs:
    rescale: float = 0.0


def rescale_cfg(eps: torch.Tensor, positive: torch.Tensor, phi: float) -> torch.Tensor:
    """phi * eps * std(positive) / std(eps) + (1 - phi) * eps, std per image."""
    dims = list(range(1, eps.ndim))
    std_pos = positive.std(dim=dims, keepdim=True)
    std_cfg = eps.std(dim=dims, keepdim=True)
    return phi * (eps * (std_pos / std_cfg)) + (1.0 - phi) * eps


@dataclass(frozen=True)
class RescaleHook:
    """A CFGHook: rescale the combined prediction toward the last positive part's std."""

    phi: float

    def __call__(
        self, eps: torch.Tensor, outputs: torch.Tensor, cond: StepConditioning, info: StepInfo
    ) -> torch.Tensor:
        positive = outputs.chunk(1 + len(cond.conds))[-1]
        return rescale_cfg(eps, positive, self.phi)


class CFGRescaleExtension:
    title = "CFG Rescale Extension"

    def setup(self, catalog: Catalog, placement: Placement) -> None:
        """Nothing to load."""

    def parse_args(self, value: Any, *, field: str) -> RescaleArgs:
        """[rescale, trailing] (or {"rescale", "trailing"}) -> RescaleArgs."""
        args = script_args(value, field=field)
        if len(args) == 1 and isinstance(args[0], Mapping):
            named = args[0]
            args = [named.get(n) for n in _NAMES]
        problems: list[Problem] = []
        phi = args[0] if args and args[0] is not None else 0.0
        if isinstance(phi, bool) or not isinstance(phi, int | float) or not 0 <= phi <= 1:
            problems.append(Problem(f"{field}.args[0]", phi, "rescale: expected a number 0..1"))
            phi = 0.0
        trailing = args[1] if len(args) > 1 and args[1] is not None else False
        if not isinstance(trailing, bool):
            problems.append(Problem(f"{field}.args[1]", trailing, "trailing: expected a bool"))
        elif trailing:
            problems.append(
                Problem(
                    f"{field}.args[1]",
                    trailing,
                    "DDIM Trailing is not supported by this server; send false",
                )
            )
        if problems:
            raise RequestError(problems)
        return RescaleArgs(float(phi))

    def prepare(self, ctx: GenerationContext, args: Any) -> Effects:
        """A CFG hook when rescale > 0 (the real extension does nothing at 0)."""
        if not isinstance(args, RescaleArgs) or args.rescale <= 0:
            return Effects()
        return Effects(
            cfg_hooks=[RescaleHook(args.rescale)], infotext={"CFG Rescale": args.rescale}
        )

    def listings(self) -> Mapping[str, Listing]:
        return {}


EXTENSION = CFGRescaleExtension  # a class: every engine makes its own instance
