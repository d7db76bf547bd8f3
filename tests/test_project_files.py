"""Project wiring that a broken build would otherwise only show on Replicate."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, version = line.split("==")
            found[package.lower()] = version
    return found


def test_cuda_requirements_are_the_local_pins_minus_cog_plus_xformers() -> None:
    local, cuda = pins("requirements.txt"), pins("requirements-cuda.txt")
    assert {k: v for k, v in local.items() if k != "cog"} == {
        k: v for k, v in cuda.items() if k != "xformers"
    }
    assert "xformers" in cuda and "xformers" not in local


def test_cog_yaml_points_at_real_files_and_pins() -> None:
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    module, cls = config["predict"].split(":")
    tree = ast.parse((ROOT / module).read_text())
    assert cls in {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert (ROOT / config["build"]["python_requirements"]).is_file()
    assert config["build"]["sdk_version"] == pins("requirements.txt")["cog"]
    assert config["build"]["python_version"] == "3.11"
    assert pins("requirements.txt")["torch"] == "2.13.0"  # whose CUDA build is 13.0
    assert config["build"]["cuda"] == "13.0"


def test_engine_never_imports_cog() -> None:
    for path in (ROOT / "engine").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import cog|from cog\b)", text, re.MULTILINE), path
