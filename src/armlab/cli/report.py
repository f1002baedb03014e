"""CLI commands for report."""

from armlab.cli.app import app  # noqa: F401
