"""The typer app every command module registers on (kept apart to avoid import cycles), and the
conventions every command shares: help text, list flags, the experiment path the user typed."""

from __future__ import annotations

import re
import shlex
from typing import Any

import click
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from armlab.errors import Stopped

# The experiment path as the user typed it, for messages: library code says `armlab prepare EXP`
# (it does not know how the file was named), `cli.main` says `armlab prepare exp.toml`.
_typed_exp: str | None = None


def with_typed_exp(text: str) -> str:
    """`text` with the placeholder EXP replaced by the experiment path the user typed (if any)."""
    if _typed_exp is None:
        return text
    return re.sub(r"(?<![\w$<])EXP(?![\w>])", lambda _: shlex.quote(_typed_exp), text)


def _plain_params(ctx: click.Context, params: list[click.Parameter]) -> list[click.Parameter]:
    for p in params:
        if isinstance(p, TyperArgument) and p.metavar is None:
            p.metavar = p.name.upper()
        elif isinstance(p, TyperOption) and p.metavar is None:
            if p.is_flag:
                p.metavar = ""  # typer prints the metavar as the type column: nothing for a flag
            elif p.multiple:  # <list[str]> -> <str>...: the flag takes one value, as often as needed
                p.metavar = re.sub(r"^<list\[(.*)\]>$", r"<\1>...", p.display_type(ctx))
    return params


class Group(TyperGroup):
    """The `armlab` group, with the same plain help as its commands (`--version`, `--help`)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_params(ctx, super().get_params(ctx))


class Command(TyperCommand):
    """typer's command with plainer help: `EXP` (not `{exp}`) in the usage line, no `<bool>` on
    flags (they take no value), and Ctrl-C as `errors.Stopped`."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _plain_params(ctx, super().get_params(ctx))

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = p.metavar + ("..." if p.nargs != 1 else "")
                pieces.append(name if p.required else f"[{name}]")
        return pieces

    def invoke(self, ctx: click.Context) -> Any:
        global _typed_exp
        if ctx.params.get("exp") is not None:
            _typed_exp = str(ctx.params["exp"])
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # typer would turn it into a silent Exit(130) before `cli.main` could say anything
            raise Stopped("interrupted; rerun the same command to resume") from None


class App(typer.Typer):
    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)


app = App(
    name="armlab",
    cls=Group,
    help="Comparable data-selection training arms for nanochat-style LLM pretraining.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from armlab import __version__

        print(f"armlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print armlab's version and exit"
    ),
) -> None:
    """Comparable data-selection training arms for nanochat-style LLM pretraining."""


def check_device(value: str | None) -> str | None:
    """`--device` callback: refuse a typo at parse time, before any work (the demo would prepare first)."""
    if value is not None and value not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{value!r}: use cpu or cuda")
    return value


def name_flag(param: typer.CallbackParam, value: str | None) -> str | None:
    """Callback of a flag whose value becomes a path (`--run-name`, `--run`): refuse `../x`, `a/b`
    at parse time (armlab.names; the workdir refuses them again where they become paths)."""
    from armlab.names import check_name

    return None if value is None else check_name(value, param.opts[0] if param.opts else str(param.name))


def check_executor(value: str | None) -> str | None:
    """`--executor` callback (prepare, score): local or ray, refused at parse time."""
    if value is not None and value not in ("local", "ray"):
        raise typer.BadParameter(f"{value!r}: use local or ray")
    return value


# -- list flags ---------------------------------------------------------------------------------
# Every flag that takes several values is repeatable (`--arm a --arm b`), like `pip install -e`
# or `docker -e`; names also take a comma-separated list (`--arm a,b`). Paths are repeat-only
# (a comma is a legal character in a file name).
def split_list(values: list[str] | None) -> list[str] | None:
    """Repeatable flag values with commas split: ["a,b", "c"] -> ["a", "b", "c"]; none -> None."""
    if not values:
        return None
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return out or None


def split_ints(values: list[str] | None) -> list[int] | None:
    """`split_list` for integers (`--seed 0 --seed 1` or `--seed 0,1`)."""
    items = split_list(values)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise typer.BadParameter(f"{','.join(values or [])!r}: expected integers, e.g. 0,1") from None
