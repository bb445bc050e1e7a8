"""Z-Explorer's LLM side: prompt enhancement, variable values and templates, through the gateway.

The client talks to the LiteLLM gateway with the OpenAI SDK, so local and cloud models are only
names (``LLM_MODEL``). Settings come from the environment and ``./.env`` (see ``Settings``).

    from client import Client

    with Client() as llm:
        print(llm.enhance_prompt("a cute fox", instruction="studio ghibli"))
        print(llm.generate_prompt_variable_values("cat_breed", "a __cat_breed__ on a sofa", 5))
        for item in llm.expand("a __mythical_creature__ in a forest > cinematic : x3"):
            print(item.prompt)
        llm.release_gpu()  # the local models leave the GPU before the image model loads

``AsyncClient`` has the same methods, awaited. Errors are ``ClientError`` subclasses whose
messages say what to fix; see ``client._errors`` for the tree.
"""

from client._client import (
    AsyncClient,
    Client,
    ExpandedPrompt,
    enhance_prompt,
    generate_prompt_variable_values,
    generate_text,
    release_gpu,
)
from client._config import Settings, load_settings
from client._doctor import Check, diagnose
from client._errors import (
    ClientError,
    ConfigurationError,
    ContextLengthError,
    GatewayAuthError,
    GatewayError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    LibraryError,
    ModelNotFoundError,
    ModelUnavailableError,
    ProviderAuthError,
    RateLimitError,
    RequestError,
    ResponseError,
    TemplateError,
    VariableExistsError,
)
from client._library import Library, Variable
from client._local import LocalModelState, LocalState, ReleaseResult
from client._template import Template, parse_template

__all__ = [
    "AsyncClient",
    "Check",
    "Client",
    "ClientError",
    "ConfigurationError",
    "ContextLengthError",
    "ExpandedPrompt",
    "GatewayAuthError",
    "GatewayError",
    "GatewayTimeoutError",
    "GatewayUnreachableError",
    "Library",
    "LibraryError",
    "LocalModelState",
    "LocalState",
    "ModelNotFoundError",
    "ModelUnavailableError",
    "ProviderAuthError",
    "RateLimitError",
    "ReleaseResult",
    "RequestError",
    "ResponseError",
    "Settings",
    "Template",
    "TemplateError",
    "Variable",
    "VariableExistsError",
    "diagnose",
    "enhance_prompt",
    "generate_prompt_variable_values",
    "generate_text",
    "load_settings",
    "parse_template",
    "release_gpu",
]
