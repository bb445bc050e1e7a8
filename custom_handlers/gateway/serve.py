"""``z-explorer-gateway``: start the LiteLLM proxy with safe defaults for a local tool.

    uv run z-explorer-gateway [--port 4000] [any other `litellm` option]

It does three things, then runs ``litellm --config proxy_config.yaml`` as a child process that it
restarts if it dies (``supervisor``: a bounded number of times, with one log line per death):

1. If no ``LITELLM_MASTER_KEY`` is set (environment or ``./.env``), it creates a strong one, appends
   it to ``./.env`` (owner-only permissions, other lines kept) and says so. The gateway never
   starts without a key.
2. It binds to 127.0.0.1 unless ``--host`` is given: the gateway serves this machine by default.
3. It sets ``LITELLM_LOCAL_MODEL_COST_MAP=True`` unless set, so start-up needs no network.

``uv run litellm --config proxy_config.yaml`` keeps working for anyone who sets the key themselves.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

from custom_handlers.gateway.supervisor import Supervisor

ENV_FILE = ".env"
KEY_VAR = "LITELLM_MASTER_KEY"


def read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def ensure_master_key(env_file: Path) -> tuple[str, bool]:
    """The master key from the environment or ``env_file``; creates one there if neither has it.

    Returns ``(key, created)``. The file keeps its other lines and ends up owner-only (0600).
    """
    key = os.environ.get(KEY_VAR) or read_env_file(env_file).get(KEY_VAR)
    if key:
        return key, False
    key = "sk-" + secrets.token_urlsafe(32)
    existing = env_file.read_text() if env_file.is_file() else ""
    separator = "" if not existing or existing.endswith("\n") else "\n"
    line = "# Gateway key, created by z-explorer-gateway. Clients send it as their API key.\n"
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(f"{separator}{line}{KEY_VAR}={key}\n")
    os.chmod(env_file, 0o600)
    return key, True


def litellm_command(args: list[str], config: Path) -> list[str]:
    exe = Path(sys.executable).with_name("litellm")
    program = str(exe) if exe.exists() else (shutil.which("litellm") or "litellm")
    command = [program, "--config", str(config)]
    if "--host" not in args:
        command += ["--host", "127.0.0.1"]
    return command + args


def check_one_worker(args: list[str]) -> str | None:
    """An error message if ``args`` (or ``NUM_WORKERS``, which LiteLLM reads when the option is
    not given) ask for several worker processes, else None.

    Each LiteLLM worker process would load its own copy of the local model onto the same GPU.
    """
    option, value = "NUM_WORKERS=", os.environ.get("NUM_WORKERS")
    for i, arg in enumerate(args):
        if arg.startswith("--num_workers="):
            option, value = "--num_workers ", arg.split("=", 1)[1]
        elif arg == "--num_workers" and i + 1 < len(args):
            option, value = "--num_workers ", args[i + 1]
    if value is None or value.strip() in ("", "1"):
        return None
    return (
        f"error: {option}{value}: each worker process would load its own copy of "
        "the local model onto the GPU. Run one worker (the default); it serves requests "
        "concurrently and batches them. To scale out, see docs/scaling.md."
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if (problem := check_one_worker(args)) is not None:
        sys.exit(problem)
    config = Path(os.environ.get("Z_EXPLORER_GATEWAY_CONFIG", "proxy_config.yaml"))
    if not config.is_file():
        sys.exit(
            f"error: {config} not found. Run z-explorer-gateway from the project folder that "
            "holds proxy_config.yaml, or set Z_EXPLORER_GATEWAY_CONFIG to its path."
        )
    env_file = Path(ENV_FILE).resolve()
    key, created = ensure_master_key(env_file)
    if created:
        print(
            f"Created a gateway key and saved it as {KEY_VAR} in {env_file} (owner-only). "
            "Clients use it as their API key.",
            file=sys.stderr,
        )
    os.environ[KEY_VAR] = key
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sys.exit(Supervisor(litellm_command(args, config)).run())


if __name__ == "__main__":
    main()
