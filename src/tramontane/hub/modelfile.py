"""Ollama's Modelfile, read into the settings a stored model carries (`tramontane create NAME -f FILE`).

    FROM ./mistral-7b-instruct.Q4_K_M.gguf        # a GGUF file or model folder, or a stored model's name
    PARAMETER temperature 0.2
    PARAMETER stop "</s>"                           # repeatable: the stop strings add up
    SYSTEM "You answer in French."                  # (or a triple-quoted string, over several lines)
    MESSAGE user Bonjour                            # a conversation every chat starts with
    MESSAGE assistant Bonjour ! Que puis-je faire pour vous ?
    ADAPTER ./my-lora                               # a LoRA adapter folder (PEFT), applied to every answer
    LICENSE "Apache 2.0"
    TEMPLATE "{{ .Prompt }}"                        # formats chats instead of the model's template

Instructions are case-insensitive, one per line; a value is the rest of the line, a "quoted" string, or
a string in triple double quotes that may span lines; `#` starts a comment line. Paths are relative to the
Modelfile's folder. PARAMETER names and value types are Ollama's (`OPTION_TYPES`); a sampler this
engine lacks (mirostat, typical_p, tfs_z) is refused unless set to its "off" value, and runtime
options (num_ctx, num_gpu...) are kept but have no effect, as in requests (serve/ollama_requests.py).

TEMPLATE is a Go template, as Ollama formats prompts with: it replaces the model's own chat template
(text/go_chat.py renders it as Ollama does), checked when the Modelfile is read. Models whose chats
mistral-common formats take none.
Every mistake is a `ModelfileError` naming the line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TramontaneError

# Ollama's option names and the types of their values (Modelfile PARAMETERs and requests' `options`)
OPTION_TYPES: dict[str, type] = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "seed": int,
    "num_predict": int,
    "stop": str,
    "repeat_penalty": float,
    "repeat_last_n": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "mirostat": int,
    "mirostat_tau": float,
    "mirostat_eta": float,
    "typical_p": float,
    "tfs_z": float,
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "num_thread": int,
    "num_keep": int,
    "low_vram": bool,
    "f16_kv": bool,
    "logits_all": bool,
    "vocab_only": bool,
    "use_mmap": bool,
    "use_mlock": bool,
    "numa": bool,
    "embedding_only": bool,
    "penalize_newline": bool,
}
# samplers this engine has not, and the value that turns each off
SAMPLERS_OFF: dict[str, Any] = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
ROLES = ("system", "user", "assistant")
INSTRUCTIONS = ("from", "parameter", "system", "template", "adapter", "license", "message")


# options that keep their OpenAI name, those translated, and those that do not change an answer
_SAME = ("temperature", "top_k", "top_p", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty")
_MAPPED = ("num_predict", "repeat_penalty", "repeat_last_n")
IGNORED_OPTIONS = frozenset(OPTION_TYPES) - {*_SAME, *_MAPPED, *SAMPLERS_OFF}  # num_ctx, num_gpu, mirostat_tau...


class ModelfileError(TramontaneError):
    """A Modelfile that cannot be read: names the file, the line and the problem."""


class OptionError(ModelfileError):
    """An Ollama option (a PARAMETER or a request's `options` entry) that cannot be honoured; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Ollama options (None values dropped) that this engine can honour, else OptionError."""
    given = {k: v for k, v in options.items() if v is not None}
    for key, value in given.items():
        if key not in OPTION_TYPES:
            raise OptionError(key, f"unknown option {key[:60]!r}; the options are {', '.join(sorted(OPTION_TYPES))}")
        if key in SAMPLERS_OFF and value != SAMPLERS_OFF[key]:
            raise OptionError(key, f"this engine has no {key} sampler; leave {key} out (or at {SAMPLERS_OFF[key]})")
    return given


def sampling_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Checked Ollama options as OpenAI sampling fields: `num_predict` is max_tokens (-1 and -2: up to
    the context's end), `repeat_penalty` is repetition_penalty (over the whole context, as vLLM's;
    `repeat_last_n` 0 turns it off); the others in _SAME keep their names, and IGNORED_OPTIONS go."""
    fields = {k: options[k] for k in _SAME if k in options}
    if "num_predict" in options:
        value = options["num_predict"]
        if isinstance(value, bool) or not isinstance(value, int) or value < -2:
            raise OptionError("num_predict", f"num_predict must be an integer >= -2 (-1: no limit), got {value!r}")
        fields["max_tokens"] = None if value < 0 else value
    if options.get("repeat_penalty") is not None and options.get("repeat_last_n") != 0:
        fields["repetition_penalty"] = options["repeat_penalty"]
    return fields


@dataclass
class ModelSettings:
    """What a created model carries besides its weights: stored in its tramontane.json ("modelfile"),
    its adapter as the folder `adapter/` next to the weights."""

    parameters: dict[str, Any] = field(default_factory=dict)  # Ollama's names; stop: a list
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)  # every chat starts with these
    template: str | None = None
    license: str | None = None
    adapter: Path | None = None  # a LoRA adapter folder, applied to every answer

    def stored(self) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "system": self.system,
            "messages": self.messages,
            "template": self.template,
            "license": self.license,
            "adapter": self.adapter is not None,
        }

    @classmethod
    def read(cls, data: dict[str, Any], folder: Path) -> ModelSettings:
        """The settings stored by `stored()` in the model folder `folder` (defensively: a hand-edited file)."""
        parameters = data.get("parameters")
        messages = data.get("messages")
        text = {k: data.get(k) if isinstance(data.get(k), str) else None for k in ("system", "template", "license")}
        return cls(
            parameters=parameters if isinstance(parameters, dict) else {},
            messages=[m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else [],
            adapter=folder / "adapter" if data.get("adapter") else None,
            **text,
        )

    def over(self, base: ModelSettings) -> ModelSettings:
        """These settings on top of the model built on (Ollama's FROM a created model inherits its own)."""
        return ModelSettings(
            parameters={**base.parameters, **self.parameters},
            system=self.system if self.system is not None else base.system,
            messages=self.messages or base.messages,
            template=self.template if self.template is not None else base.template,
            license=self.license if self.license is not None else base.license,
            adapter=self.adapter or base.adapter,
        )


@dataclass
class Modelfile:
    base: str  # FROM, as written
    folder: Path  # where relative paths start
    settings: ModelSettings = field(default_factory=ModelSettings)  # adapter: the folder named by ADAPTER


def _unquote(value: str) -> str:
    v = value.strip()
    if len(v) >= 6 and v.startswith('"""') and v.endswith('"""'):
        return v[3:-3]
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return re.sub(r"\\(.)", r"\1", v[1:-1])
    return v


def _instructions(text: str, source: str) -> list[tuple[int, str, str]]:
    """(line number, instruction in lower case, raw value: a triple-quoted string joined across lines)."""
    lines = text.replace("\r\n", "\n").split("\n")
    out, i = [], 0
    while i < len(lines):
        number, stripped = i + 1, lines[i].strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        word, _, value = stripped.partition(" ") if " " in stripped else stripped.partition("\t")
        if word.lower() not in INSTRUCTIONS:
            names = ", ".join(n.upper() for n in INSTRUCTIONS)
            raise ModelfileError(f"{source}:{number}: unknown instruction {word[:40]!r} (the instructions: {names})")
        while value.count('"""') % 2:  # a """ string goes on to the line that closes it
            if i >= len(lines):
                raise ModelfileError(f'{source}:{number}: a """ string that is never closed')
            value += "\n" + lines[i]
            i += 1
        out.append((number, word.lower(), value.strip()))
    return out


def parameter(name: str, value: str, where: str) -> tuple[str, Any]:
    """A PARAMETER's name (lower case) and its value in its type."""
    key = name.lower()
    kind = OPTION_TYPES.get(key)
    if kind is None:
        raise ModelfileError(f"{where}: unknown parameter {name!r} (the parameters: {', '.join(OPTION_TYPES)})")
    try:
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError
            typed: Any = value.lower() == "true"
        else:
            typed = kind(value)
    except ValueError:
        raise ModelfileError(f"{where}: parameter {key} takes {kind.__name__} values, got {value[:60]!r}") from None
    try:
        check_options({key: typed})
    except OptionError as exc:
        raise ModelfileError(f"{where}: {exc}") from None
    return key, typed


def parse_modelfile(text: str, folder: Path, source: str = "Modelfile") -> Modelfile:
    base = None
    found = ModelSettings()
    for line, word, raw in _instructions(text, source):
        where = f"{source}:{line}"
        value = raw if word in ("parameter", "message") else _unquote(raw)
        if not value and word != "system":
            raise ModelfileError(f"{where}: {word.upper()} needs a value")
        if word == "from":
            if base is not None:
                raise ModelfileError(f"{where}: a second FROM (a Modelfile has one)")
            base = value
        elif word == "parameter":
            name, rest = (value.split(None, 1) + [""])[:2]
            key, typed = parameter(name, _unquote(rest), where)
            if key == "stop":
                found.parameters.setdefault("stop", []).append(typed)
            else:
                found.parameters[key] = typed
        elif word == "message":
            role, content = (value.split(None, 1) + [""])[:2]
            if role.lower() not in ROLES:
                raise ModelfileError(f"{where}: MESSAGE role must be one of {', '.join(ROLES)}, got {role[:40]!r}")
            found.messages.append({"role": role.lower(), "content": _unquote(content)})
        elif word == "adapter":
            found.adapter = (folder / value).expanduser()
        elif word == "template":
            found.template = _checked_template(value, where)
        else:  # system, license
            setattr(found, word, value)
    if base is None:
        raise ModelfileError(f"{source}: no FROM line (it names the model to build on)")
    return Modelfile(base, folder, found)


def _checked_template(source: str, where: str) -> str:
    from ..errors import TemplateError
    from ..text.go_template import GoTemplate

    try:
        GoTemplate.parse(source)
    except TemplateError as exc:
        raise ModelfileError(f"{where}: TEMPLATE is not a valid Go template: {exc}") from None
    return source
