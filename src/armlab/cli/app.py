"""The typer app every command module registers on (kept apart to avoid import cycles)."""

import typer

app = typer.Typer(
    name="armlab",
    help="Comparable data-selection training arms for nanochat-style LLM pretraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

