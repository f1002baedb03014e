"""CLI commands for blob."""

from armlab.cli.app import app  # noqa: F401
