"""CLI commands for train."""

from armlab.cli.app import app  # noqa: F401
