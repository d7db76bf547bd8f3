"""ControlNet through `alwayson_scripts.controlnet` (Mikubill sd-webui-controlnet's API)."""

from .extension import ControlNetExtension

EXTENSION = ControlNetExtension()

__all__ = ["EXTENSION", "ControlNetExtension"]
