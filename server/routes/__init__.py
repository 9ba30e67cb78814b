"""Thin HTTP routes; each takes its service through an `Annotated` dependency."""
