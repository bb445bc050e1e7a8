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
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client._client import DEFAULT_VALUE_COUNT, Client
from client._config import Settings, load_settings
from client._doctor import Check, diagnose, gateway_answers
from client._errors import ClientError
from client._gateway_config import GatewayConfig, config_path
from client._local import DEFAULT_RELEASE_TIMEOUT, describe_release
from client._setup import Choice, Plan, advice, apply, make_plan, options_choice, read_env
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
    """Check the URL, the key and the model, say what to fix, and show the local models."""
    settings = load_settings(warn=False)  # its notices are among the checks
    with _working("Checking") as progress:
        checks = diagnose(settings, model, on_progress=progress)
    _print_checks(checks)
    if any(check.ok is False for check in checks):
        raise typer.Exit(1)


@app.command("release-gpu")
@_handles_errors
def release_gpu(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Only this local model (its model_name in proxy_config.yaml; default: all).",
        ),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=1, help="Seconds to wait for running requests and the release."
        ),
    ] = DEFAULT_RELEASE_TIMEOUT,
) -> None:
    """Unload the gateway's local models and give their GPU memory back (e.g. for the image model).

    Requests already running or queued finish first; the next request loads a model again.
    """
    settings = _settings()
    which = f"the local model {model}" if model else "the local models"
    with Client(settings) as client, _working(f"Releasing {which}") as progress:
        before = client.local_state()
        targets = [m for m in before.models if model is None or m.model == model]
        running = sum(m.running_requests for m in targets)
        queued = sum(m.queued_requests for m in targets)
        if running or queued:
            progress(f"Releasing {which} after {running} running and {queued} queued requests")
        result = client.release_gpu(model, timeout=timeout)
    typer.echo(describe_release(before, result, model))


@app.command()
def setup(
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Use a local model: the Qwen3-4B, or --local-model's checkpoint (no questions).",
        ),
    ] = False,
    z_image: Annotated[
        bool,
        typer.Option("--z-image", help="Use Z-Image's Qwen3 text encoder as the local model."),
    ] = False,
    provider: Annotated[
        str | None,
        typer.Option(
            "--provider",
            help="Use a cloud model: openai, anthropic, ollama or other (no questions).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="With --provider: its model id (gpt-4o, claude-sonnet-4-5, qwen3:4b, or for "
            "other a LiteLLM id such as gemini/gemini-2.5-flash). Alone: the gateway model to "
            "use (LLM_MODEL).",
        ),
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(
            "--alias",
            help="With --provider, --local or --z-image: the model_name to give a new model.",
        ),
    ] = None,
    local_model: Annotated[
        str | None,
        typer.Option(
            "--local-model",
            help="With --local or --z-image: Hugging Face repo id or model folder, served as "
            "zlocal/<it> (a folder is written as an absolute path).",
        ),
    ] = None,
    save_key: Annotated[
        bool,
        typer.Option(
            "--save-key",
            help="With --provider: save the provider key from the environment in ./.env.",
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Ask nothing: keep the current choice or defaults.")
    ] = False,
    url: Annotated[str | None, typer.Option("--url", help="The gateway's URL.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="The gateway's key.")] = None,
    library: Annotated[
        Path | None, typer.Option("--library", help="The variable library folder.")
    ] = None,
) -> None:
    """Choose the LLM (local, cloud, or Z-Image's encoder); write ./.env and proxy_config.yaml.

    The model is a proxy_config.yaml entry (added if the file has none for it; a local one as
    zlocal/<repo id or folder>) and ./.env's LLM_MODEL names it. On a terminal, without options,
    it asks. Then it runs doctor and says what to run next.

    Exit status: 0 saved (also when the gateway is not running yet); 1 an error, or a running
    gateway that fails the check; 130 cancelled (nothing changed).
    """
    _setup(locals())


@_handles_errors
def _setup(options: dict) -> None:
    try:
        planned = _plan_setup(options)
    except KeyboardInterrupt:  # nothing is written before the plan is confirmed
        _note("\nSetup cancelled: nothing was changed.", "yellow")
        raise typer.Exit(130) from None
    if planned is None:
        _note("Nothing was changed.", "yellow")
        return
    plan, choice, asked = planned
    _save(plan, choice, asked)
    _finish_setup(plan)


def _plan_setup(options: dict) -> tuple[Plan, Choice, bool] | None:
    """The changes the options (or, on a terminal without options, the answers) ask for."""
    client_values = {
        "LITELLM_PROXY_API_BASE": options["url"],
        "LITELLM_PROXY_API_KEY": options["key"],
        "LOCAL_LIBRARY_DIR": str(options["library"]) if options["library"] else None,
    }
    client_values = {k: v for k, v in client_values.items() if v}
    chooses = [options["local"], options["z_image"], options["provider"] is not None]
    if sum(chooses) > 1:
        _fail("choose one of --local, --z-image and --provider.")
    env_file = read_env()
    interactive = not (any(chooses) or options["yes"] or client_values or options["model"])
    if interactive and not (sys.stdin.isatty() and sys.stdout.isatty()):
        _fail(
            "setup asks its questions on a terminal; in a script pass --local, --z-image, "
            "--provider NAME [--model ID], or --yes (see z-explorer setup --help)."
        )
    if not (any(chooses) or options["yes"] or interactive):  # client settings only
        if options["model"]:
            client_values["LLM_MODEL"] = options["model"]
        choice, config = Choice("client"), None
    else:
        config = GatewayConfig(config_path())
        choice = _choose(options, config, env_file, interactive)
    choice = replace(choice, client={**choice.client, **client_values})
    plan = make_plan(choice, config)
    if interactive and not _confirmed(plan):
        return None
    return plan, choice, interactive


def _confirmed(plan: Plan) -> bool:
    if plan.empty:
        return True
    console = _stderr()
    console.print(Text("Changes:", style="bold"))
    for line in plan.summary():
        console.print(Text(f"  {line}"))
    from client._wizard import confirm

    return confirm("Save these changes?")


def _choose(options: dict, config: GatewayConfig, env_file: dict, interactive: bool) -> Choice:
    if interactive:
        from client._wizard import Wizard  # questionary: imported only to ask

        return Wizard(config, env_file, _stderr()).run()
    return options_choice(
        local=options["local"],
        z_image=options["z_image"],
        provider_name=options["provider"],
        model=options["model"],
        alias=options["alias"],
        local_model=options["local_model"],
        save_key=options["save_key"],
        config=config,
        env_file=env_file,
    )


def _save(plan: Plan, choice: Choice, asked: bool) -> None:
    if plan.empty:
        _note("Nothing to change: the settings already say this.", "green")
    else:
        apply(plan)
        _note("Saved:", "green")
        for line in plan.summary():
            _note(f"  {line}", "green")
    for name in plan.shadowed():
        _note(
            f"warning: {name} is also set in this shell's environment, which wins over ./.env: "
            f"run `unset {name}` (and remove it from your shell profile) for this to apply.",
            "bold yellow",
        )
    if asked and choice.kind != "cloud":
        return  # the wizard said it before the question
    for line in advice(choice, read_env(plan.env_path)):
        _note(line, "yellow")


def _finish_setup(plan: Plan) -> None:
    """Run doctor and say what to run next. A gateway that is not running yet is the expected
    state after a first setup (exit 0); any other failed check exits 1."""
    settings = load_settings(warn=False)
    running = gateway_answers(settings)
    if running and plan.gateway_side:
        _note(
            f"The gateway at {settings.gateway_url} is running with the old settings: stop it "
            "(Ctrl-C in its terminal), start it again with `uv run z-explorer-gateway`, then "
            "check with `uv run z-explorer doctor`.",
            "bold yellow",
        )
        return
    with _working("Checking") as progress:
        checks = diagnose(settings, on_progress=progress)
    _print_checks(checks)
    failed = {check.name for check in checks if check.ok is False}
    if not failed:
        _note('Ready. Next: uv run z-explorer enhance "a cute fox"', "bold green")
        return
    if failed == {"gateway"} and not running:
        _note(
            "Next: start the gateway in this folder and leave it running:\n"
            "  uv run z-explorer-gateway\n"
            'then, in another terminal: uv run z-explorer enhance "a cute fox"',
            "bold",
        )
        return
    raise typer.Exit(1)


def _print_checks(checks: list[Check]) -> None:
    out = Console(highlight=False, soft_wrap=True)
    marks = {True: ("✓", "green"), False: ("✗", "bold red"), None: ("!", "yellow")}
    for check in checks:
        mark, style = marks[check.ok]
        out.print(Text.assemble((f"{mark} {check.name}: ", style), check.detail))


@app.command()
@_handles_errors
def pull(
    names: Annotated[
        list[str] | None,
        typer.Argument(metavar="MODEL_NAME", help="Local models of proxy_config.yaml."),
    ] = None,
) -> None:
    """Download the local models' checkpoints ahead (all of them without a name).

    Only the files the gateway loads, into the Hugging Face cache; an interrupted one resumes.

    Exit status: 0 done; 1 a download failed; 2 an unknown model name; 130 interrupted.
    """
    from client._pull import pull as pull_models

    out = Console(highlight=False, soft_wrap=True)
    raise typer.Exit(pull_models(names or [], out, _stderr()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
