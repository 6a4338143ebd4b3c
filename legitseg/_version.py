"""The version, in a leaf that every layer may import (legitseg/__init__.py re-exports it)."""

__version__ = "0.1.0"
