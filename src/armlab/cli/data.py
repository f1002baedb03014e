"""CLI commands for data."""

from armlab.cli.app import app  # noqa: F401
