"""LoRA adapters under the device budget (engine/working_set.py).

An adapter is an entry whose tensors are its LoRA weights inside its checkpoint's layers (so
they are counted once, with the checkpoint, and move with it); under memory pressure it is
deleted (only while no request in flight uses that checkpoint's adapters: LoraManager.drop),
and its file is read again on its next use. The manager is told before a file loads
(room for its size on disk) and of every adapter a generation uses (pinned until it ends)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .networks import COMPONENT_WEIGHTS, LoraInfo, LoraManager
from .working_set import CHECKPOINT, Entry, WorkingSet


def adapter_tensors(manager: LoraManager, adapter_id: str) -> Iterator[torch.Tensor]:
    """The weights peft holds for one adapter (`...lora_A.<adapter>.weight` and the like)."""
    marker = f".{manager.adapter_name(adapter_id)}."
    for component in COMPONENT_WEIGHTS:
        model = getattr(manager.loaded.pipe, component, None)
        if model is None:
            continue
        for name, param in model.named_parameters():
            if marker in name:
                yield param


def adapter_entry(manager: LoraManager, info: LoraInfo) -> Entry:
    title, aid = manager.loaded.info.title, info.adapter_id
    return Entry(
        "lora",
        f"{info.name} in {title}",
        tensors=lambda: adapter_tensors(manager, aid),
        parent=(CHECKPOINT, title),
        drop=lambda: manager.drop(aid),
    )


def track(manager: LoraManager, memory: WorkingSet) -> None:
    """Put `manager`'s adapters under `memory`'s budget (nothing to do without a budget)."""
    if memory.budget is None:
        return
    manager.before_load = lambda info: memory.before_load(info.path.stat().st_size)
    manager.on_use = lambda info: memory.use(adapter_entry(manager, info))
