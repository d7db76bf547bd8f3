"""Setup time and bytes read for N tiny checkpoints: cold (no hash cache) vs warm (shipped cache).

    python scripts/bench_setup.py [--checkpoints 3]

Each measurement is a fresh process running `Engine.setup` (what a new container does). Bytes
are read from /proc/self/io of that process: `rchar` counts read() calls, which is how files are
hashed; safetensors loads through mmap, which `rchar` does not see, so the cold-warm difference
is the hashing, and `hashed` is the hash cache's own count of bytes it hashed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import engine.api as api
from engine.catalog import HashCache

made = []
real = HashCache.__init__
def record(self, *args, **kwargs):
    real(self, *args, **kwargs)
    made.append(self)
HashCache.__init__ = record

def io():
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])

models = Path(sys.argv[1])
before, started = io(), time.perf_counter()
api.Engine.setup(api.EngineConfig(models, models / ".cache"))
seconds, rchar = time.perf_counter() - started, io() - before
print(json.dumps({"seconds": seconds, "rchar": rchar, "hashed": sum(c.bytes_hashed for c in made)}))
"""


def measure(models: Path) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SD_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(models), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=3, help="at least 2")
    args = parser.parse_args()

    from scripts.make_tiny_models import make_all

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "tiny"
        make_all(source, seed=0)
        models = Path(tmp) / "models"
        (models / "checkpoints").mkdir(parents=True)
        sd1 = source / "checkpoints" / "tiny-sd15.safetensors"
        for index in range(args.checkpoints):
            shutil.copyfile(sd1, models / "checkpoints" / f"model-{index}.safetensors")
        total = args.checkpoints * sd1.stat().st_size
        cold = measure(models)  # no hashes.json yet: every checkpoint is hashed
        warm = measure(models)  # the cache the cold run wrote, as shipped in an image
        # One checkpoint fewer: the difference is what one more checkpoint costs to read.
        (models / "checkpoints" / f"model-{args.checkpoints - 1}.safetensors").unlink()
        fewer = measure(models)
    mib = 2**20
    print(f"{args.checkpoints} checkpoint(s), {total / mib:.1f} MiB in all")
    for label, run in (("cold", cold), ("warm", warm)):
        print(
            f"{label}: setup {run['seconds']:.2f} s, read() {run['rchar'] / mib:.1f} MiB, "
            f"hashed {run['hashed'] / mib:.1f} MiB"
        )
    one = total / args.checkpoints
    print(
        f"one more checkpoint ({one / mib:.1f} MiB), warm: read() "
        f"{(warm['rchar'] - fewer['rchar']) / mib:.1f} MiB, setup "
        f"{warm['seconds'] - fewer['seconds']:+.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
