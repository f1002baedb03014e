"""CLI commands for remote."""

from armlab.cli.app import app  # noqa: F401
