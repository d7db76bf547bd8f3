"""A webui (AUTOMATIC1111) compatible Stable Diffusion engine built on diffusers.

The engine never imports cog: `predict.py` adapts it to Cog.
"""

__version__ = "0.1.0"
