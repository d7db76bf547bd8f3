"""Always-on script extensions; each subpackage exposes EXTENSION, a class (see
engine/extensions.py)."""
