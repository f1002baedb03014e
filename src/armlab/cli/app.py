"""The typer app every command module registers on (kept apart to avoid import cycles)."""

import typer

app = typer.Typer(
    name="armlab",
    help="Comparable data-selection training arms for nanochat-style LLM pretraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def check_device(value: str | None) -> str | None:
    """`--device` callback: refuse a typo at parse time, before any work (the demo would prepare first)."""
    if value is not None and value not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{value!r}: use cpu or cuda")
    return value
