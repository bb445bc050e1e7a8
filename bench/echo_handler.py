"""A trivial LiteLLM custom handler that answers "ok" at once: the floor for gateway overhead."""

from __future__ import annotations

import time

import litellm
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import GenericStreamingChunk


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

    async def astreaming(self, model, messages, *args, **kwargs):
        """ "ok" as one chunk, then the end: the floor for a stream's first chunk."""
        for text, finished in (("ok", False), ("", True)):
            yield GenericStreamingChunk(
                text=text,
                is_finished=finished,
                finish_reason="stop" if finished else None,
                index=0,
                tool_use=None,
                usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            )


echo = Echo()
