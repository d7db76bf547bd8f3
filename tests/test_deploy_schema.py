"""The Cog schema as Replicate sees it, and the playground inputs against the engine's tables."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from cog.input import FieldInfo

from engine.limits import Limits
from engine.payload import Img2ImgRequest, _bound_of, parse_request
from engine.playground import FIELD_NAMES, FIELDS
from engine.samplers import list_samplers, list_schedulers
from predict import Predictor

from .cog_schema import static_schema

LIMITS = Limits()


def runtime_inputs() -> dict[str, FieldInfo]:
    """What Python sees: each predict() parameter's Input()."""
    params = inspect.signature(Predictor.predict).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


@pytest.fixture(scope="module")
def schema() -> tuple[dict[str, Any], list[str]]:
    return static_schema()


def test_cogs_static_parser_keeps_every_description_default_and_choice(schema: Any) -> None:
    spec, notes = schema
    assert notes == []  # the tool notes each description/default Cog would mangle or drop
    components = spec["components"]["schemas"]
    properties = components["Input"]["properties"]
    inputs = runtime_inputs()
    assert list(properties) == list(inputs)
    assert "required" not in components["Input"]  # every input has a default
    for name, field in inputs.items():
        prop = properties[name]
        assert prop.get("description") == field.description, name
        assert prop.get("default") == field.default, name
        if field.choices is not None:
            assert components[name]["enum"] == field.choices, name
        assert prop.get("minimum") == field.ge and prop.get("maximum") == field.le, name


def test_inputs_are_api_json_endpoint_then_the_playground_fields() -> None:
    assert list(runtime_inputs()) == ["api_json", "endpoint", *FIELD_NAMES]


def test_playground_defaults_are_the_tables_and_webuis_api_defaults() -> None:
    inputs = runtime_inputs()
    for spec in FIELDS:
        assert inputs[spec.name].default == spec.default, spec.name
    request = parse_request({}, "txt2img", LIMITS).request
    for name in ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "seed"):
        assert inputs[name].default == getattr(request, name), name
    for name in ("batch_size", "denoising_strength", "enable_hr", "hr_scale"):
        assert inputs[name].default == getattr(request, name), name


def test_sampler_and_scheduler_choices_are_the_engines_tables() -> None:
    inputs = runtime_inputs()
    assert inputs["sampler"].choices == [row["name"] for row in list_samplers()]
    assert inputs["scheduler"].choices == [row["label"] for row in list_schedulers()]


@pytest.mark.parametrize("name", ["width", "height", "steps", "batch_size", "denoising_strength"])
def test_playground_bounds_lie_within_the_engines_limits(name: str) -> None:
    field = runtime_inputs()[name]
    bound = _bound_of(Img2ImgRequest.model_fields[name])
    assert bound is not None
    limit = bound.get(LIMITS)
    assert limit.lo <= field.ge and field.le <= limit.hi


def test_the_vendored_schema_tool_is_the_teams_tool() -> None:
    from .cog_schema import VENDORED, shared_tool

    shared = shared_tool()
    if shared is None:
        pytest.skip("no shared/tools folder above this checkout: the vendored copy is used")
    assert VENDORED.read_bytes() == shared.read_bytes()
