"""The webui API on a local HTTP server (`python -m sdapi`, `make serve`), from the same engine
as the Cog predictor: webui's `/sdapi/v1/*` routes with webui's request and response shapes.

The engine stays Cog-free and FastAPI-free; this package only adapts HTTP to `engine.api.Engine`.
"""
