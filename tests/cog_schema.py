"""The OpenAPI schema `cog build` would bake into the image, made the way Cog's Go CLI makes it.

The team's tool (shared/tools/cog_static_schema.py, beside the repository) ports Cog's static
parser (tree-sitter over predict.py). The HTTP tests put its output at `.cog/openapi_schema.json`,
the one place coglet reads a schema from, so Cog's own input validation runs as on Replicate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOOL = Path("shared") / "tools" / "cog_static_schema.py"


# A verbatim copy of the team's tool, for checkouts with no shared/ folder above them (a clean CI
# clone elsewhere); tests/test_deploy_schema.py keeps it identical to shared/tools when present.
VENDORED = REPO / "tests" / "tools" / "cog_static_schema.py"


def shared_tool() -> Path | None:
    """shared/tools/ beside the checkout or beside one of its parents (worktrees)."""
    for folder in REPO.parents:
        if (folder / TOOL).is_file():
            return folder / TOOL
    return None


def find_tool() -> Path:
    return shared_tool() or VENDORED


def static_schema(project: Path = REPO) -> tuple[dict[str, Any], list[str]]:
    """(schema, notes): the notes say where Cog would mangle or drop a description/default."""
    done = subprocess.run(
        [sys.executable, str(find_tool()), str(project)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cog build would fail: {done.stderr.strip()}")
    notes = [ln for ln in done.stderr.splitlines() if ln.strip()]
    return json.loads(done.stdout), notes


def install_schema(project: Path = REPO) -> Path:
    """Write the static schema where coglet reads it (`./.cog/openapi_schema.json`)."""
    schema, _ = static_schema(project)
    target = project / ".cog" / "openapi_schema.json"
    target.parent.mkdir(exist_ok=True)
    # Atomic: several server-starting test modules may write it at once.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(schema, handle, indent=2)
    os.replace(tmp, target)
    return target
