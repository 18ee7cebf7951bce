"""Helpers for local development services (installed as the `velocity_scripts` package)."""
