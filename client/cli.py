"""``z-explorer``: the client's commands. Thin: each one calls the library and prints.

Results go to stdout, plain, one item per line (or JSON with ``--json``), so they pipe well.
Progress, notes and errors go to stderr: a spinner only on a terminal, and every failure is one
line (``error: ...``) and exit status 1.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client._client import DEFAULT_VALUE_COUNT, Client
from client._config import Settings, load_settings, write_env_file
from client._doctor import Check, diagnose
from client._errors import ClientError
from client._template import parse_template

app = typer.Typer(
    name="z-explorer",
    help="Z-Explorer's LLM side: enhance prompts, generate variable values, expand templates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="A model the gateway serves (default: LLM_MODEL)."),
]


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _note(message: str, style: str = "dim") -> None:
    _stderr().print(Text(message, style=style))


def _fail(message: str) -> None:
    console = _stderr()
    console.print(Text.assemble(("error: ", "bold red"), " ".join(message.split())))
    raise typer.Exit(1)


# typer has its own Exit and Abort (not click's subclasses); both kinds end a command on purpose.
_PASS_THROUGH = (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort)


def _handles_errors(command: Callable) -> Callable:
    """Every failure becomes one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _PASS_THROUGH:  # typer's and click's own exits and usage errors
            raise
        except ClientError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted.")
        except Exception as exc:  # a bug: still one line, with enough to report it
            _fail(f"unexpected {type(exc).__name__}: {exc} (please report this)")

    return wrapper


def _settings(**overrides) -> Settings:
    """The settings, with each deprecation notice shown once as a warning line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        settings = load_settings(**overrides)
    for warning in caught:
        _stderr().print(Text.assemble(("warning: ", "bold yellow"), str(warning.message)))
    return settings


@contextmanager
def _working(message: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr while the block runs, only on a terminal. Yields an update function."""
    console = _stderr()
    if not console.is_terminal:
        yield lambda _message: None
        return
    with console.status(message) as status:
        yield lambda new: status.update(new)


@app.command()
@_handles_errors
def enhance(
    prompt: Annotated[str, typer.Argument(help="A short idea, e.g. 'a cute fox'.")],
    instruction: Annotated[
        str, typer.Option("--instruction", "-i", help="How to enhance it, e.g. 'studio ghibli'.")
    ] = "",
    model: ModelOption = None,
) -> None:
    """Expand a short idea into a rich image prompt (keeps every fact of the idea)."""
    with Client(_settings(), model=model) as client, _working(f"Enhancing with {client.model}"):
        enhanced = client.enhance_prompt(prompt, instruction)
    typer.echo(enhanced)


@app.command("vars")
@_handles_errors
def vars_(
    name: Annotated[str, typer.Argument(help="The variable, e.g. cat_breed or styles/lighting.")],
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, max=500, help="How many values to generate.")
    ] = DEFAULT_VALUE_COUNT,
    context: Annotated[
        str, typer.Option("--context", "-c", help="The prompt the variable is used in.")
    ] = "",
    model: ModelOption = None,
) -> None:
    """Generate values for a variable, save them to the library and print them.

    A variable that already has a file is not regenerated: its values are printed.
    """
    settings = _settings()
    target = f"__{name.strip('_')}__"
    spinner = f"Generating {count} values for {target} with {model or settings.model_name}"
    with Client(settings, model=model) as client, _working(spinner):
        variable, created = client.get_or_create_variable(name, count=count, context_prompt=context)
    for value in variable.values:
        typer.echo(value)
    if created:
        _note(f"Saved {len(variable.values)} values to {variable.path}")
    else:
        _note(
            f"__{variable.name}__ is already in the library ({variable.path}): these are its "
            "values. Delete or rename that file to generate new ones."
        )


@app.command()
@_handles_errors
def expand(
    template: Annotated[
        str, typer.Argument(help="E.g. 'a __mythical_creature__ in a forest > cinematic : x3'.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with the details.")] = False,
    values: Annotated[
        int,
        typer.Option(
            "--values", min=1, max=500, help="Values to generate for a variable with no file."
        ),
    ] = DEFAULT_VALUE_COUNT,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed for picking values (repeatable runs).")
    ] = None,
    model: ModelOption = None,
) -> None:
    """Print the prompts a template makes, one per line: variables filled, then enhanced."""
    parsed = parse_template(template)
    with Client(_settings(), model=model) as client, _working("Expanding") as progress:
        results = client.expand(
            parsed, values_per_variable=values, rng=random.Random(seed), on_progress=progress
        )
    if as_json:
        payload = {
            "template": parsed.text,
            "instruction": parsed.instruction,
            "count": parsed.count,
            "width": parsed.width,
            "height": parsed.height,
            "prompts": [
                {"prompt": r.prompt, "substituted": r.substituted, "values": r.values}
                for r in results
            ],
        }
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    for result in results:
        typer.echo(result.prompt)


@app.command()
@_handles_errors
def models() -> None:
    """List the models the gateway serves (* marks LLM_MODEL)."""
    settings = _settings()
    with Client(settings) as client, _working(f"Asking {settings.gateway_url}"):
        names = client.list_models()
    out = Console(highlight=False)
    if not out.is_terminal:
        for name in names:
            typer.echo(name)
        return
    out.print(Text(f"Models at {settings.gateway_url} (* is LLM_MODEL)", style="bold"))
    table = Table("", "model", box=None, show_header=False)
    for name in names:
        table.add_row("*" if name == settings.model_name else "", name)
    out.print(table)


@app.command()
@_handles_errors
def doctor(model: ModelOption = None) -> None:
    """Check the URL, the key and the model, and say what to fix."""
    settings = load_settings(warn=False)  # its notices are among the checks
    with _working("Checking") as progress:
        checks = diagnose(settings, model, on_progress=progress)
    _print_checks(checks)
    if any(check.ok is False for check in checks):
        raise typer.Exit(1)


@app.command()
@_handles_errors
def setup(
    url: Annotated[str | None, typer.Option("--url", help="The gateway's URL.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="The gateway's key.")] = None,
    model: ModelOption = None,
    library: Annotated[
        Path | None, typer.Option("--library", help="The variable library folder.")
    ] = None,
) -> None:
    """Save the client's settings to ./.env (other lines are kept), then run doctor."""
    chosen = {
        "LITELLM_PROXY_API_BASE": url,
        "LITELLM_PROXY_API_KEY": key,
        "LLM_MODEL": model,
        "LOCAL_LIBRARY_DIR": str(library) if library is not None else None,
    }
    if all(value is None for value in chosen.values()):
        if not sys.stdin.isatty():
            _fail("nothing to save: pass --url, --key, --model or --library.")
        chosen = _ask_settings(load_settings(warn=False))
    path = write_env_file(Path(".env"), {k: v for k, v in chosen.items() if v})
    _note(f"Saved {', '.join(k for k, v in chosen.items() if v)} to {path.resolve()}", "green")
    doctor(model=None)


def _ask_settings(current: Settings) -> dict[str, str | None]:
    url = typer.prompt("Gateway URL", default=current.gateway_url)
    key = typer.prompt(
        "Gateway key (empty: keep the current one)",
        default="",
        show_default=False,
        hide_input=True,
    )
    model = typer.prompt("Model", default=current.model_name)
    return {"LITELLM_PROXY_API_BASE": url, "LITELLM_PROXY_API_KEY": key, "LLM_MODEL": model}


def _print_checks(checks: list[Check]) -> None:
    out = Console(highlight=False, soft_wrap=True)
    marks = {True: ("✓", "green"), False: ("✗", "bold red"), None: ("!", "yellow")}
    for check in checks:
        mark, style = marks[check.ok]
        out.print(Text.assemble((f"{mark} {check.name}: ", style), check.detail))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
