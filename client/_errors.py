"""The client's exceptions. Every message says what went wrong and how to fix it.

    ClientError
     ├── ConfigurationError          the settings cannot work (.problems lists every one)
     ├── TemplateError               a template the prompt language cannot read (``: x0``)
     ├── LibraryError                a variable name or file in LOCAL_LIBRARY_DIR is unusable
     │    └── VariableExistsError    saving would overwrite a file that is already there
     ├── GatewayError                talking to the gateway failed (.model, .base_url)
     │    ├── GatewayUnreachableError    nothing answers at LITELLM_PROXY_API_BASE
     │    ├── GatewayTimeoutError        no answer within LLM_TIMEOUT seconds
     │    ├── GatewayAuthError           the gateway refused our key (401)
     │    ├── ModelNotFoundError         the gateway serves no such model (.available)
     │    ├── ModelUnavailableError      the model exists but cannot answer now (load failure,
     │    │                              provider unreachable)
     │    ├── RateLimitError             429 (.retry_after, seconds or None)
     │    ├── ProviderAuthError          the cloud provider's own key is missing or wrong
     │    │                              (.provider, .env_var)
     │    └── RequestError               any other refusal (.status_code)
     │         └── ContextLengthError     prompt + answer exceed the model's context
     │                                    (.context_tokens, .prompt_tokens when known)
     └── ResponseError               the model answered, but with nothing usable

Only the library raises them; only the CLI turns them into one line on stderr and an exit code.
Foreign errors (the OpenAI SDK's) are translated in one place, ``client._llm`` (``translate``, and
``translate_local`` for the gateway's /local routes).
"""

from __future__ import annotations

__all__ = [
    "ClientError",
    "ConfigurationError",
    "ContextLengthError",
    "GatewayAuthError",
    "GatewayError",
    "GatewayTimeoutError",
    "GatewayUnreachableError",
    "LibraryError",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "ProviderAuthError",
    "RateLimitError",
    "RequestError",
    "ResponseError",
    "TemplateError",
    "VariableExistsError",
]


class ClientError(Exception):
    """Base class of every error the client raises on purpose."""


class ConfigurationError(ClientError):
    """The settings cannot work. ``problems`` holds one sentence per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = f"Configuration problem: {self.problems[0]}"
        else:
            message = f"{len(self.problems)} configuration problems: " + " ".join(
                f"({i}) {p}" for i, p in enumerate(self.problems, 1)
            )
        super().__init__(message)


class TemplateError(ClientError):
    """A template the prompt language cannot read (nothing before ``>``, ``: x0``)."""


class LibraryError(ClientError):
    """A variable name or a file in the variable library is unusable."""


class VariableExistsError(LibraryError):
    """A save would overwrite an existing variable file; the file is left as it is."""

    def __init__(self, name: str, path):
        self.name = name
        self.path = path
        super().__init__(
            f"__{name}__ already exists at {path}; it was left unchanged. "
            "Delete or rename that file to save new values."
        )


class GatewayError(ClientError):
    """A request to the gateway failed. ``model`` and ``base_url`` say which request."""

    def __init__(self, message: str, *, model: str | None = None, base_url: str | None = None):
        self.model = model
        self.base_url = base_url
        super().__init__(message)


class GatewayUnreachableError(GatewayError):
    """Nothing answers at the gateway's URL."""


class GatewayTimeoutError(GatewayError):
    """The gateway did not answer within the timeout."""


class GatewayAuthError(GatewayError):
    """The gateway refused the key the client sent (HTTP 401 from the gateway itself)."""


class ModelNotFoundError(GatewayError):
    """The gateway serves no model of that name. ``available`` lists the ones it does serve."""

    def __init__(self, message: str, *, available: list[str] | None = None, **kwargs):
        self.available = available
        super().__init__(message, **kwargs)


class ModelUnavailableError(GatewayError):
    """The model exists, but cannot answer now (it failed to load, its server is down)."""


class RateLimitError(GatewayError):
    """Too many requests (HTTP 429). ``retry_after`` is in seconds, or None when unknown."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class ProviderAuthError(GatewayError):
    """The cloud provider behind the model has no key, or refused it.

    ``env_var`` names the provider's key variable (``OPENAI_API_KEY``) in the gateway's
    environment; the client's own key is not the problem.
    """

    def __init__(self, message: str, *, provider: str | None, env_var: str | None, **kwargs):
        self.provider = provider
        self.env_var = env_var
        super().__init__(message, **kwargs)


class RequestError(GatewayError):
    """Any other error answer from the gateway. ``status_code`` is its HTTP status."""

    def __init__(self, message: str, *, status_code: int | None = None, **kwargs):
        self.status_code = status_code
        super().__init__(message, **kwargs)


class ResponseError(ClientError):
    """The model answered, but its answer could not be used (empty, too few values)."""


class ContextLengthError(RequestError):
    """The prompt and the answer's budget exceed the model's context (HTTP 400).

    ``context_tokens`` and ``prompt_tokens`` are read from the message when it gives them.
    """

    def __init__(
        self,
        message: str,
        *,
        context_tokens: int | None = None,
        prompt_tokens: int | None = None,
        **kwargs,
    ):
        self.context_tokens = context_tokens
        self.prompt_tokens = prompt_tokens
        super().__init__(message, **kwargs)
