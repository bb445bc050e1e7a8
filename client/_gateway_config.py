"""The gateway's ``proxy_config.yaml``, read and edited round-trip: comments, order and layout kept.

``z-explorer setup`` only ever adds a ``model_list`` entry, for a model the file does not have yet
(a cloud model, or a local ``zlocal/...`` one with its ``model_info``); everything else in the file
is written back as it was read (ruamel.yaml's round-trip mode).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.tokens import CommentToken
from ruamel.yaml.util import load_yaml_guess_indent

from client._errors import ClientError

CONFIG_ENV = "Z_EXPLORER_GATEWAY_CONFIG"
DEFAULT_CONFIG = "proxy_config.yaml"
ADDED_COMMENT = "Added by z-explorer setup."


class GatewayConfigError(ClientError):
    """proxy_config.yaml is missing or cannot be read as the gateway's configuration."""


@dataclass(frozen=True)
class Entry:
    """One ``model_list`` entry, as plain values: its name, ``litellm_params.model``, the other
    ``litellm_params`` and its ``model_info``."""

    name: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def config_path() -> Path:
    """The file the gateway uses: Z_EXPLORER_GATEWAY_CONFIG, else ./proxy_config.yaml."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _list_layout(text: str) -> tuple[int, int]:
    """(indent, dash offset) of the block lists in ``text``; proxy_config.yaml's (4, 2) if none."""
    _, indent, offset = load_yaml_guess_indent(text) if text else (None, None, None)
    if offset is None:
        return 4, 2
    return max(indent or 2, offset + 2), offset


def _yaml(text: str = "") -> YAML:
    """A round-trip YAML that writes lists indented the way ``text`` indents them."""
    yaml = YAML()
    indent, offset = _list_layout(text)
    yaml.indent(mapping=2, sequence=indent, offset=offset)
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    yaml.brace_single_entry_mapping_in_flow_sequence = True  # keep [{a: b}] (LiteLLM fallbacks)
    return yaml


class GatewayConfig:
    """``proxy_config.yaml`` in memory; ``save()`` writes it back only if something was added."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise GatewayConfigError(
                f"{path} not found. Run z-explorer setup in the project folder (the one with "
                f"proxy_config.yaml), or set {CONFIG_ENV} to the gateway's configuration file."
            )
        try:
            self._source = path.read_text(encoding="utf-8")
            self._data = _yaml(self._source).load(self._source)
        except YAMLError as exc:
            raise GatewayConfigError(
                f"{path} is not valid YAML: {exc}".replace("\n", " ")
            ) from None
        if not isinstance(self._data, CommentedMap):
            raise GatewayConfigError(f"{path} is not a LiteLLM proxy configuration (a mapping).")
        entries = self._data.get("model_list")
        if entries is not None and not isinstance(entries, CommentedSeq):
            raise GatewayConfigError(f"{path}: model_list is not a list.")
        self.added: list[tuple[str, str]] = []

    def models(self) -> dict[str, str]:
        """``model_name`` -> ``litellm_params.model`` of every entry, in file order."""
        found = {}
        for entry in self._data.get("model_list") or []:
            if isinstance(entry, dict) and isinstance(entry.get("litellm_params"), dict):
                found[str(entry.get("model_name"))] = str(entry["litellm_params"].get("model"))
        return found

    def entries(self) -> list[Entry]:
        """Every entry with ``litellm_params``, in file order, as plain values."""
        found = []
        for item in self._data.get("model_list") or []:
            params = item.get("litellm_params") if isinstance(item, Mapping) else None
            if not isinstance(params, Mapping):
                continue
            info = item.get("model_info")
            found.append(
                Entry(
                    str(item.get("model_name")),
                    str(params.get("model")),
                    {k: v for k, v in params.items() if k != "model"},
                    dict(info) if isinstance(info, Mapping) else {},
                )
            )
        return found

    def alias_for(self, litellm_model: str) -> str | None:
        """The first ``model_name`` whose entry calls ``litellm_model``, if any."""
        for alias, model in self.models().items():
            if model == litellm_model:
                return alias
        return None

    def add_model(
        self,
        alias: str,
        litellm_model: str,
        *,
        params: Mapping[str, Any] | None = None,
        model_info: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an entry after the last one, with a comment saying where it came from.

        ``params``: ``litellm_params`` besides ``model`` (``num_retries: 0``); ``model_info``:
        written when given and not empty."""
        entries = self._data.get("model_list")
        if entries is None:
            entries = self._data["model_list"] = CommentedSeq()
        entry = CommentedMap()
        entry["model_name"] = alias
        entry["litellm_params"] = CommentedMap(model=litellm_model, **(params or {}))
        if model_info:
            entry["model_info"] = CommentedMap(model_info)
        tail = _take_trailing_comment(entries)
        entries.append(entry)
        offset = _list_layout(self._source)[1]
        entries.yaml_set_comment_before_after_key(
            len(entries) - 1, before=ADDED_COMMENT, indent=offset
        )
        if tail:
            _give_trailing_comment(entry, tail)
        self.added.append((alias, litellm_model))

    def text(self) -> str:
        out = io.StringIO()
        _yaml(self._source).dump(self._data, out)
        return out.getvalue()

    def save(self) -> None:
        """Write the file atomically, keeping its permissions; a no-op if nothing was added."""
        if not self.added:
            return
        mode = self.path.stat().st_mode & 0o777
        fd, tmp = tempfile.mkstemp(prefix=".proxy_config.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.text())
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


# The blank lines and comments after a list's last item belong, in ruamel.yaml, to that item's
# last scalar. An appended item would land after them, glued to the next top-level key; so the
# new item takes them over, and the old last item keeps its own end-of-line comment and the blank
# lines that separated it from what followed.


def _last_scalar(node) -> tuple[CommentedMap | CommentedSeq | None, object]:
    while isinstance(node, CommentedMap | CommentedSeq) and len(node):
        key = list(node)[-1] if isinstance(node, CommentedMap) else len(node) - 1
        child = node[key]
        if isinstance(child, CommentedMap | CommentedSeq) and len(child):
            node = child
            continue
        return node, key
    return None, None


def _take_trailing_comment(entries: CommentedSeq) -> str:
    holder, key = _last_scalar(entries)
    slot = holder.ca.items.get(key) if holder is not None else None
    token = slot[2] if slot and len(slot) > 2 else None
    if token is None or "\n" not in token.value:
        return ""
    first, _, rest = token.value.partition("\n")
    blank = len(rest) - len(rest.lstrip("\n"))
    token.value = first + "\n" + "\n" * blank
    return rest


def _give_trailing_comment(entry: CommentedMap, tail: str) -> None:
    holder, key = _last_scalar(entry)
    holder.ca.items[key] = [None, None, CommentToken("\n" + tail, CommentMark(0), None), None]
