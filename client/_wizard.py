"""The questions of ``z-explorer setup`` on a terminal (questionary: arrow keys, Enter, defaults).

Every question raises ``KeyboardInterrupt`` on Ctrl-C; nothing is written here, so the caller
only has to say that nothing changed. The answers become a ``Choice``; the current settings are
the defaults, so pressing Enter throughout keeps everything as it is.
"""

from __future__ import annotations

import questionary
from questionary import Choice as Option
from rich.console import Console
from rich.text import Text

from client._gateway_config import GatewayConfig
from client._providers import (
    PROVIDERS,
    Provider,
    SetupError,
    check_alias,
    check_other_model,
    default_alias,
    key_url,
    key_vars_for,
)
from client._setup import (
    Z_IMAGE_FOLDERS,
    Z_IMAGE_SOURCE,
    Choice,
    current_choice,
    default_local_source,
    has_nvidia_gpu,
    key_status,
    provider_of,
)
from client._setup_checks import check_local_folder, ollama_status, z_image_cache_note

LLM_OPTIONS = [
    Option("Local (Qwen3-4B) - runs on your GPU, about 3 GB VRAM in 4-bit", "local"),
    Option("Cloud API (LiteLLM) - OpenAI, Anthropic, Ollama, ... (0 VRAM)", "cloud"),
    Option("Z-Image text encoder - reuses the image model's Qwen3, no extra download", "z-image"),
]
PROVIDER_OPTIONS = [
    Option("OpenAI (gpt-4o-mini, gpt-4o)", "openai"),
    Option("Anthropic (Claude Haiku, Sonnet)", "anthropic"),
    Option("Ollama (local API, no key)", "ollama"),
    Option("Other (enter a LiteLLM model id)", "other"),
]
ANOTHER = "__another__"
ENTRY_NOTE = (
    "The gateway serves it as a zlocal/ model of proxy_config.yaml: setup adds that entry unless "
    "the file has one (every change is listed before anything is saved)."
)


class Wizard:
    def __init__(self, config: GatewayConfig, env_file: dict[str, str], console: Console):
        self.config = config
        self.env_file = env_file
        self.console = console
        self.current = current_choice(config, env_file)

    def run(self) -> Choice:
        self.say("Z-Explorer setup. Nothing is saved before the last question; Ctrl-C quits.")
        kind = _ask(
            questionary.select(
                "LLM:",
                choices=LLM_OPTIONS,
                default=self.current.kind,
                use_shortcuts=True,
                instruction="(arrow keys or 1-3, then Enter)",
            )
        )
        if kind == "local":
            return Choice("local", local_source=self.ask_local_source())
        if kind == "z-image":
            return Choice("z-image", local_source=self.ask_z_image_source())
        return self.ask_cloud()

    def say(self, message: str, style: str = "") -> None:
        self.console.print(Text(message, style=style))

    # ---- local ----------------------------------------------------------------------------------

    def ask_local_source(self) -> str:
        if has_nvidia_gpu():
            self.say("An NVIDIA GPU is present: the model loads in 4-bit there (about 3 GB).")
        else:
            self.say("No NVIDIA GPU found: the model will run on the CPU, slowly.", "yellow")
        same = self.current.kind == "local" and self.current.local_source
        answer = _ask(
            questionary.text(
                "Checkpoint (Hugging Face repo id or model folder):",
                default=(self.current.local_source if same else None) or default_local_source(),
                validate=lambda text: _valid(check_local_folder, text, None),
            )
        )
        self.say(ENTRY_NOTE)
        self.say("The first request loads it (a download the first time): allow a few minutes.")
        return check_local_folder(answer)

    def ask_z_image_source(self) -> str:
        same = self.current.kind == "z-image" and self.current.local_source
        answer = _ask(
            questionary.text(
                "Z-Image (Hugging Face repo id, or the folder it was downloaded to):",
                default=(self.current.local_source if same else None) or Z_IMAGE_SOURCE,
                validate=lambda text: _valid(check_local_folder, text, Z_IMAGE_FOLDERS),
            )
        )
        source = check_local_folder(answer, Z_IMAGE_FOLDERS)
        self.say(ENTRY_NOTE)
        self.say(z_image_cache_note(source))
        return source

    # ---- cloud ----------------------------------------------------------------------------------

    def ask_cloud(self) -> Choice:
        current = provider_of(self.current.litellm_model) if self.current.kind == "cloud" else None
        name = _ask(
            questionary.select(
                "Provider:", choices=PROVIDER_OPTIONS, default=current, use_shortcuts=True
            )
        )
        prov = PROVIDERS[name]
        litellm_model = self.ask_model(prov)
        alias = self.ask_alias(prov, litellm_model)
        keys = self.ask_keys(prov, litellm_model)
        return Choice("cloud", litellm_model=litellm_model, alias=alias, keys_to_store=keys)

    def ask_model(self, prov: Provider) -> str:
        now = self.current.litellm_model if self.current.kind == "cloud" else None
        if prov.name == "ollama":
            bare = now.split("/", 1)[1] if now and provider_of(now) == "ollama" else "qwen3:4b"
            tag = _ask(questionary.text("Ollama model (as `ollama list` shows it):", default=bare))
            self.say(ollama_status(tag.strip()))
            return prov.litellm_model(tag)
        if prov.name == "other":
            return self.ask_other_model(now if provider_of(now) == "other" else None)
        options = [Option(f"{m.id} - {m.note}", prov.litellm_model(m.id)) for m in prov.models]
        options.append(Option(f"Another {prov.label} model (enter its id)", ANOTHER))
        values = [o.value for o in options]
        picked = _ask(
            questionary.select(
                "Model:", choices=options, default=now if now in values else values[0]
            )
        )
        if picked != ANOTHER:
            return picked
        model_id = _ask(questionary.text(f"{prov.label} model id:", validate=_not_empty))
        return prov.litellm_model(model_id)

    def ask_other_model(self, now: str | None) -> str:
        while True:
            model = _ask(
                questionary.text(
                    "LiteLLM model id (<provider>/<model>, e.g. gemini/gemini-2.5-flash):",
                    default=now or "",
                    validate=_not_empty,
                )
            )
            try:
                return check_other_model(model)
            except SetupError as exc:
                self.say(str(exc), "red")

    def ask_alias(self, prov: Provider, litellm_model: str) -> str:
        existing = self.config.alias_for(litellm_model)
        if existing:
            return existing
        alias = default_alias(prov, litellm_model)
        taken = self.config.models()
        if alias not in taken:
            return alias
        return _ask(
            questionary.text(
                f"proxy_config.yaml already has a model named {alias!r}. Name for {litellm_model}:",
                validate=lambda text: _valid_alias(text, taken),
            )
        ).strip()

    def ask_keys(self, prov: Provider, litellm_model: str) -> dict[str, str]:
        needed = key_vars_for(prov, litellm_model)
        if prov.name == "other" and not needed:
            self.say(
                f"✓ LiteLLM finds every variable {litellm_model} needs in this shell.", "green"
            )
        stored = {}
        for name in needed:
            where = key_status(name, self.env_file)
            if where == "environment":
                self.say(f"✓ {name} is set in this shell; start the gateway from it.", "green")
                continue
            if where == ".env":
                self.say(f"✓ {name} is in ./.env.", "green")
                continue
            self.say(
                f"{prov.label if prov.name != 'other' else litellm_model} needs an API key: get "
                f"one at {key_url(prov, litellm_model)}. The gateway reads it from {name}."
            )
            save = _ask(
                questionary.select(
                    f"Where should the gateway find {name}?",
                    choices=[
                        Option("In my shell: I will export it (nothing is written to disk)", False),
                        Option("In ./.env: save it on this disk (readable by you only)", True),
                    ],
                    default=False,
                )
            )
            if save:
                stored[name] = _ask(questionary.password(f"{name}:", validate=_not_empty)).strip()
        return stored


def confirm(question: str) -> bool:
    return bool(_ask(questionary.confirm(question, default=True)))


def _ask(question: questionary.Question):
    """The answer; Ctrl-C raises KeyboardInterrupt (questionary's ``ask`` would swallow it)."""
    return question.unsafe_ask()


def _not_empty(text: str) -> bool | str:
    return bool(text.strip()) or "Please enter a value."


def _valid(check, text: str, folders) -> bool | str:
    try:
        check(text, folders)
    except SetupError as exc:
        return str(exc)
    return True


def _valid_alias(text: str, taken: dict[str, str]) -> bool | str:
    try:
        alias = check_alias(text)
    except SetupError as exc:
        return str(exc)
    return f"{alias!r} is taken too." if alias in taken else True
