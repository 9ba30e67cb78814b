"""The server distribution's version (reported by /version and the OpenAPI document)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("adapterd")
except PackageNotFoundError:  # running from a source checkout that was not installed
    VERSION = "0.1.0"
