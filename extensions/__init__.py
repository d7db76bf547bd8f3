"""Always-on script extensions; each subpackage exposes EXTENSION (see engine/extensions.py)."""
