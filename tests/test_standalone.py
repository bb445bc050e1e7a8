"""The inference stack stands alone: it imports neither LiteLLM nor a web framework.

So it can be driven in-process on a machine that has torch and transformers but no LiteLLM
(``bench/gpu.py`` on a lent GPU machine). Checked in a fresh interpreter in which importing
``litellm``, ``fastapi``, ``starlette`` or ``uvicorn`` fails, and the engine then generates.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import custom_handlers.inference

# Every module of the inference folder but the LiteLLM provider itself.
INFERENCE_STACK = sorted(
    f"custom_handlers.inference.{path.stem}"
    for path in Path(custom_handlers.inference.__file__).parent.glob("*.py")
    if path.stem not in ("__init__", "provider")
)
BLOCKED = ("litellm", "fastapi", "starlette", "uvicorn")


def test_imports_run_one_way_from_the_gateway_to_the_inference_stack():
    folder = Path(custom_handlers.inference.__file__).parent
    for path in folder.glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            is_import = words[:1] in (["from"], ["import"])
            assert not (is_import and words[1].startswith("custom_handlers.gateway")), path.name
    assert len(INFERENCE_STACK) >= 10  # engine, loader, sampling, constraints, ... all found


def test_the_inference_stack_imports_and_generates_without_litellm_or_fastapi(tiny_model_dir):
    script = textwrap.dedent(
        f"""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"blocked: {{name}}")

        sys.meta_path.insert(0, Block())
        for module in {INFERENCE_STACK!r}:
            importlib.import_module(module)
        assert not any(m.startswith("custom_handlers.gateway") for m in sys.modules)

        from custom_handlers.inference.engine import Engine
        from custom_handlers.inference.jobs import Done, Finish, Job, SyncSink
        from custom_handlers.inference.loader import ModelHolder
        from custom_handlers.inference.request import SamplingParams
        from custom_handlers.inference.settings import LocalModelSettings

        holder = ModelHolder(lambda: LocalModelSettings(model={str(tiny_model_dir)!r}))
        engine = Engine(holder)
        tokenizer = holder.get().tokenizer
        prompt = tokenizer("a fox")["input_ids"]
        job = engine.submit(Job(prompt, SamplingParams(temperature=0.0), 5, SyncSink()))
        events = []
        while not isinstance(event := job.sink.get(), Done):
            events.append(event)
        assert isinstance(events[-1], Finish) and events[-1].completion_tokens == 5, events
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        print("ok", loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ok []"
