"""Run one prediction through the Cog `Predictor`, as Cog would, and save what it returns.

    python scripts/run_example.py examples/txt2img.json [--endpoint auto] [--out output]

Uses SD_MODELS_DIR (default: the repository root) like the predictor does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("payload", type=Path, help="a webui API payload (JSON file)")
    parser.add_argument("--endpoint", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "output")
    args = parser.parse_args()

    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    output = asyncio.run(
        predictor.predict(api_json=args.payload.read_text(encoding="utf-8"), endpoint=args.endpoint)
    )

    args.out.mkdir(parents=True, exist_ok=True)
    if output.listing:
        print(json.dumps(json.loads(output.listing), indent=2))
        return 0
    if args.endpoint.startswith("extra-"):  # the extras endpoints: images and html_info
        for index, image in enumerate(output.images):
            target = args.out / f"{args.payload.stem}-extras-{index}{image.suffix}"
            shutil.copyfile(image, target)
            print(f"wrote {target}")
        print(output.info)
        return 0
    info = json.loads(output.info)
    for index, image in enumerate(output.images):
        target = args.out / f"{args.payload.stem}-{info['all_seeds'][index]}{image.suffix}"
        shutil.copyfile(image, target)
        print(f"wrote {target}")
    (args.out / f"{args.payload.stem}-info.json").write_text(
        json.dumps(info, indent=2), encoding="utf-8"
    )
    print("infotext:\n" + info["infotexts"][0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
