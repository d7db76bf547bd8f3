"""Playground inputs merged into the payload, progress lines as Replicate parses them, and the
error text a failed prediction shows."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from replicate.prediction import Prediction

from engine.errors import GenerationError, ModelLoadError, Problem, RequestError, public_error
from engine.playground import FIELDS, merge_playground
from engine.progress import progress_line

DEFAULTS = {spec.name: spec.default for spec in FIELDS}


def test_defaults_change_nothing() -> None:
    payload = {"prompt": "a cat", "steps": 20}
    assert merge_playground(payload, DEFAULTS) == payload
    assert merge_playground({}, DEFAULTS) == {}


def test_playground_values_fill_what_api_json_leaves_out() -> None:
    values = {
        **DEFAULTS,
        "prompt": "a lighthouse",
        "steps": 12,
        "sampler": "DPM++ 2M",
        "checkpoint": "tiny-sd15",
        "output_format": "webp",
    }
    merged = merge_playground({"override_settings": {"CLIP_stop_at_last_layers": 2}}, values)
    assert merged == {
        "prompt": "a lighthouse",
        "steps": 12,
        "sampler_name": "DPM++ 2M",
        "override_settings": {
            "CLIP_stop_at_last_layers": 2,
            "sd_model_checkpoint": "tiny-sd15",
            "samples_format": "webp",
        },
    }


def test_api_json_wins_field_by_field() -> None:
    payload = {
        "prompt": "from api_json",
        "sampler_index": "Heun",
        "override_settings": {"sd_model_checkpoint": "mine"},
    }
    values = {**DEFAULTS, "prompt": "typed", "sampler": "LMS", "checkpoint": "other", "seed": 7}
    merged = merge_playground(payload, values)
    assert merged["prompt"] == "from api_json"
    assert "sampler_name" not in merged  # sampler_index sets the sampler in webui too
    assert merged["override_settings"] == {"sd_model_checkpoint": "mine"}
    assert merged["seed"] == 7
    assert payload["override_settings"] == {"sd_model_checkpoint": "mine"}  # not mutated


def test_image_files_become_webui_base64(tmp_path: Path) -> None:
    image, mask = tmp_path / "init.png", tmp_path / "mask.png"
    image.write_bytes(b"\x89PNG-init")
    mask.write_bytes(b"\x89PNG-mask")
    merged = merge_playground({}, {**DEFAULTS, "init_image": image, "mask": mask})
    assert merged["init_images"] == [base64.b64encode(b"\x89PNG-init").decode()]
    assert merged["mask"] == base64.b64encode(b"\x89PNG-mask").decode()


def test_a_wrong_override_settings_type_is_left_for_the_parser_to_report() -> None:
    merged = merge_playground({"override_settings": "x"}, {**DEFAULTS, "checkpoint": "a"})
    assert merged == {"override_settings": "x"}


# ---------------------------------------------------------------------------------- progress


@pytest.mark.parametrize("total", [1, 3, 4, 7, 20, 150])
def test_every_progress_line_parses_with_replicates_regex(total: int) -> None:
    """replicate-python's Prediction.Progress reads the last matching log line."""
    logs = "Using seed: 1\n"
    for step in range(1, total + 1):
        logs += progress_line(step, total) + "\n"
        progress = Prediction.Progress.parse(logs)
        assert progress is not None, progress_line(step, total)
        assert (progress.current, progress.total) == (step, total)
        assert progress.percentage == (step * 100 // total) / 100


def test_progress_line_has_tqdms_shape() -> None:
    assert progress_line(2, 4) == " 50%|#####     | 2/4"
    assert progress_line(4, 4) == "100%|##########| 4/4"


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (
            RequestError([Problem("steps", 0, "must be an integer from 1 to 150")]),
            "Invalid request: steps: got 0; must be an integer from 1 to 150",
        ),
        (ModelLoadError("no checkpoint found"), "Model could not be loaded: no checkpoint found"),
        (GenerationError("the result was NaN"), "Generation failed: the result was NaN"),
    ],
)
def test_public_error_reads_as_the_sentence_without_a_class_name(exc: Exception, text: str) -> None:
    public = public_error(exc)  # type: ignore[arg-type]
    # coglet shows `<qualname>: <str>` (pyo3's PyErr display).
    assert f"{type(public).__qualname__}: {public}" == text
