"""Download the model files listed in models.toml, in parallel, resumable, sha256-verified.

    python scripts/fetch_models.py [--manifest models.toml] [--models-dir DIR] [--jobs 4]

Run it before `cog build`/`cog push` to bake the weights into the image (the hash cache it
writes, `<models dir>/.cache/hashes.json`, goes in too, so a fresh container hashes nothing),
or let setup run it with SD_FETCH_MODELS=1. A file whose size or sha256 does not match is never
moved into the models folder; an interrupted download resumes on the next run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.errors import ModelLoadError  # noqa: E402
from engine.fetch import Fetcher, read_manifest  # noqa: E402


class Bar:
    """One tqdm bar over all bytes (tqdm comes with huggingface_hub)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.lock = threading.Lock()
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024)

    def __call__(self, path: str, received: int) -> None:
        with self.lock:
            self.bar.update(received)

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=REPO / "models.toml")
    parser.add_argument(
        "--models-dir", type=Path, default=Path(os.environ.get("SD_MODELS_DIR") or REPO)
    )
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        files = read_manifest(args.manifest)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar = Bar(sum(f.size for f in files))
    try:
        problems = Fetcher(args.models_dir, retries=args.retries).fetch_all(files, args.jobs, bar)
    finally:
        bar.close()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(files) - len(problems)} of {len(files)} file(s) in place in {args.models_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
