"""A trivial LiteLLM custom handler that answers "ok" at once: the floor for gateway overhead."""

from __future__ import annotations

import time

import litellm
from litellm.llms.custom_llm import CustomLLM


class Echo(CustomLLM):
    def _answer(self, model, model_response):
        response = model_response if model_response is not None else litellm.ModelResponse()
        response.choices = [
            litellm.Choices(
                index=0,
                finish_reason="stop",
                message=litellm.Message(role="assistant", content="ok"),
            )
        ]
        response.usage = litellm.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        response.model, response.created = model, int(time.time())
        return response

    def completion(self, model, messages, *args, model_response=None, **kwargs):
        return self._answer(model, model_response)

    async def acompletion(self, model, messages, *args, model_response=None, **kwargs):
        return self._answer(model, model_response)


echo = Echo()
