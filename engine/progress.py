"""Progress lines in tqdm's shape, which Replicate turns into `prediction.progress`.

Replicate's clients read progress from the prediction's logs: the last line that matches
`^\\s*(\\d+)%\\s*\\|.+?\\|\\s*(\\d+)/(\\d+)` (replicate-python's `Prediction.Progress`), i.e.
`NN%|bar| k/n` at the start of a line. One line per sampling step of each pass (hires fix and
the refiner start a new pass at 1/n), printed to stdout, which Cog captures as the log.
"""

from __future__ import annotations

import sys
from typing import TextIO

BAR_WIDTH = 10


def progress_line(step: int, total: int) -> str:
    """`' 50%|#####     | 2/4'` for step 2 of 4."""
    total = max(total, 1)
    step = min(max(step, 0), total)
    filled = step * BAR_WIDTH // total
    percent = step * 100 // total
    return f"{percent:3d}%|{'#' * filled}{' ' * (BAR_WIDTH - filled)}| {step}/{total}"


def print_progress(step: int, total: int, stream: TextIO | None = None) -> None:
    """Print one progress line (flushed: Cog streams the log while the prediction runs)."""
    print(progress_line(step, total), file=stream or sys.stdout, flush=True)
