"""Benchmark (not a test): the engine's time per sampling step against diffusers, in one run.

    python scripts/bench_sampling.py [--models DIR] [--size 64] [--repeats 3]

For Euler a, DPM++ 2M Karras and DPM++ 2M SDE Karras it times a full txt2img request through
the engine and diffusers' own StableDiffusionPipeline on the same components with the
matching scheduler, each at two step counts; the difference divided by the extra steps is the
time per step without the fixed costs (text encoding, VAE decode, PNG). It prints
milliseconds per step and the ratio engine / diffusers. On the tiny models (made into a
temporary folder unless --models names a folder made by make_tiny_models.py) the UNet is
cheap, so the ratio shows the per-step overhead of the sampler layer itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engine.api import Engine, EngineConfig
from scripts.make_tiny_models import make_all

LOW, HIGH = 4, 16
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("Euler a", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    (
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"},
    ),
    (
        "DPM++ 2M SDE Karras",
        "DPMSolverMultistepScheduler",
        {
            "use_karras_sigmas": True,
            "algorithm_type": "sde-dpmsolver++",
            "final_sigmas_type": "zero",
        },
    ),
]


def timed(action: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds: on a shared machine other work only ever adds
    time, so the minimum is the figure least disturbed by it."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return min(samples)


def per_step(run: Callable[[int], object], repeats: int) -> float:
    """Milliseconds per step: (t(HIGH) - t(LOW)) / (HIGH - LOW)."""
    run(LOW)  # warm-up
    low = timed(lambda: run(LOW), repeats)
    high = timed(lambda: run(HIGH), repeats)
    return (high - low) / (HIGH - LOW) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            models = Path(tmp)
            make_all(models, seed=0)
        engine = Engine.setup(EngineConfig(models_dir=models, cache_dir=models / ".cache"))
        loaded = next(iter(engine.models.cache.loaded.values()))
        pipe = loaded.pipe
        import diffusers

        print(f"checkpoint: {loaded.info.title}, {args.size}x{args.size}, steps {LOW}->{HIGH}")
        print(f"{'sampler':<22}{'engine ms/step':>16}{'diffusers ms/step':>20}{'ratio':>8}")
        for name, cls_name, settings in CASES:
            body = {
                "prompt": "a lighthouse on a cliff",
                "negative_prompt": "blurry",
                "width": args.size,
                "height": args.size,
                "seed": 1,
                "cfg_scale": 7,
                "sampler_name": name,
                "override_settings": {"sd_model_checkpoint": loaded.info.title},
            }

            def ours(steps: int, body: dict[str, Any] = body) -> object:
                return engine.handle("txt2img", json.dumps({**body, "steps": steps}))

            cls = getattr(diffusers, cls_name)
            config = {k: v for k, v in loaded.scheduler_config.items() if not k.startswith("_")}
            scheduler = cls.from_config({**config, **settings})
            reference: Any = diffusers.StableDiffusionPipeline(
                vae=pipe.vae,
                text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer,
                unet=pipe.unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            reference.set_progress_bar_config(disable=True)

            def theirs(steps: int, reference: Any = reference) -> object:
                return reference(
                    "a lighthouse on a cliff",
                    negative_prompt="blurry",
                    width=args.size,
                    height=args.size,
                    num_inference_steps=steps,
                    guidance_scale=7.0,
                    generator=torch.Generator().manual_seed(1),
                )

            a = per_step(ours, args.repeats)
            b = per_step(theirs, args.repeats)
            print(f"{name:<22}{a:>16.2f}{b:>20.2f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
