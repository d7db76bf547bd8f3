"""ControlNet through `alwayson_scripts.controlnet` (Mikubill sd-webui-controlnet's API)."""

from .extension import ControlNetExtension

EXTENSION = ControlNetExtension  # a class: every engine makes its own instance

__all__ = ["EXTENSION", "ControlNetExtension"]
