"""scripts/gpu_check.py on the CPU with the tiny models: the same code path a CUDA machine runs
first (every feature row, the diffusers comparison, the switch figures, the JSON report)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from scripts import gpu_check
from scripts import make_tiny_models as maker

LAYOUTS = Path(__file__).parent / "data" / "layouts"


def test_gpu_check_runs_every_feature_on_the_cpu(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--device", "cpu", "--tiny", "--models", str(tiny_models_dir), "--steps", "2"]
    code = gpu_check.main([*argv, "--skip-tests", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {row["feature"]: row for row in report["features"]}
    assert set(rows) == set(gpu_check.features(gpu_check.TINY, 2))
    assert [name for name, row in rows.items() if row["status"] != "ok"] == []
    assert code == 0
    assert all(row["it_per_s"] > 0 for row in rows.values())
    for family in ("sd1", "sdxl"):
        figures = report["vs_diffusers"][family]
        assert figures["diffusers_ms_per_step"] != 0 and "ratio" in figures
    assert report["switch"]["same_checkpoint_s"] > 0
    # A budget for one checkpoint: every request moved its checkpoint in, same pictures.
    working = report["working_set"]
    assert working["same_pictures"] is True and len(working["requests"]) == 4
    assert {m["direction"] for m in working["moves"]} == {"to device", "to host"}
    assert report["device"].startswith("device cpu, dtype float32")
    # Concurrent requests: every client count ran, and the pictures are the serial ones.
    for family in ("sd1", "sdxl"):
        rows = report["concurrency"][family]
        assert set(rows) == {"serial", "1", "4", "8"}
        assert all(row["images_per_s"] > 0 for row in rows.values())
        assert max(row["max_level_diff"] for k, row in rows.items() if k != "serial") <= 1


@pytest.mark.parametrize(
    ("dims", "maker_fn", "name"),
    [
        (gpu_check.REAL_SD15, "sd1_checkpoint", "sd15-emaonly"),
        (gpu_check.REAL_SDXL, "sdxl_checkpoint", "sdxl-base"),
    ],
)
def test_real_size_checkpoints_have_the_released_files_keys_and_shapes(
    dims: object, maker_fn: str, name: str
) -> None:
    # The check's "real-size" models are the tiny maker's layout code at the released
    # dimensions; the published key listings (tests/data/layouts) say they match the downloads.
    ours = {p.key: tuple(p.shape) for p in getattr(maker, maker_fn)(dims)}
    with gzip.open(LAYOUTS / f"{name}.json.gz", "rt", encoding="utf-8") as handle:
        released = {k: tuple(v) for k, v in json.load(handle)["tensors"].items()}
    # The files differ only in buffers a loader ignores (LDM's schedule, position_ids).
    ignorable = {k for k in released.keys() ^ ours.keys() if "position_ids" in k or "." not in k}
    assert released.keys() ^ ours.keys() <= ignorable
    assert {k: v for k, v in ours.items() if k in released} == {
        k: v for k, v in released.items() if k in ours
    }
