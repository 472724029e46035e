"""Training data for fine-tuning: mistral-finetune's JSONL formats, tokenized with loss masks, checked
line by line, and packed into batches.

Two kinds of line (mistral-finetune's README, "Prepare dataset"):

- instruct: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}`, with
  optional `"tools"`. Assistant messages may carry `tool_calls` instead of content, and a `weight` of
  0 (not trained) or 1. The loss covers assistant tokens only: the content and the token(s) ending
  the turn (`</s>`, `<|im_end|>`), so the model learns to stop; never system, user or tool text, nor
  the template's scaffolding. The last message must be the assistant's, as mistral-finetune requires.
- pretrain: `{"text": ...}`: [bos] + encode(text) + [eos], the loss on every token. The BOS is there
  when the tokenizer starts plain prompts with one (`default_add_bos`), the EOS when it has one.

How the assistant tokens are found:

- Jinja templates (`HFTokenizer`): by prefix differences. For assistant message i, the tokens of
  messages[:i] with the generation prompt must be a prefix of the tokens of messages[:i+1], itself a
  prefix of the whole conversation; the difference is the assistant's turn, cut after its last stop
  token (ChatML's "\\n" after `<|im_end|>` is scaffolding). A template that rewrites earlier turns
  fails the check, and its lines are reported.
- mistral-common (`MistralCommonTokenizer`): no prefix property (v2 and v3 put the system prompt into
  the *last* user message, and outside finetuning mode a conversation may not end with the
  assistant). Like mistral-finetune, the request is validated in mistral-common's finetuning mode,
  normalized, and encoded message by message with the instruct tokenizer's own encoders; the
  assistant encoder's tokens (content and `</s>`) are trained. Their concatenation must equal
  mistral-common's whole-conversation encoding.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tramontane.errors import ConfigError, LoadError, TemplateError, TokenizerError
from tramontane.text.chat_template import mistral_request
from tramontane.text.tokenizer import MistralCommonTokenizer, Tokenizer

IGNORE_INDEX = -100  # target of positions without loss (torch's cross_entropy default ignore_index)
ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]


@dataclass(frozen=True)
class Example:
    """One tokenized line. mask[j] True: token j is a training target (its loss counts)."""

    line: int  # 1-based line number in the file
    tokens: list[int]
    mask: list[bool]


@dataclass(frozen=True)
class Problem:
    """A line that did not become an example, and why."""

    line: int
    reason: str


@dataclass
class DataReport:
    """Everything `read_dataset` learned about a file: the valid examples and every problem."""

    path: Path
    kind: str  # "instruct", "pretrain", "mixed", or "none" when no line had 'messages' or 'text'
    examples: list[Example]
    problems: list[Problem]
    tokens: int  # total tokens of the valid examples
    trained_tokens: int  # tokens with mask True

    def summary(self) -> str:
        head = (
            f"{self.path}: {self.kind} data, {len(self.examples)} examples, {self.tokens} tokens "
            f"({self.trained_tokens} trained), {len(self.problems)} problem lines"
        )
        return "\n".join([head, *(f"{self.path}:{p.line}: {p.reason}" for p in self.problems)])


class _Skip(Exception):
    """A line that cannot become an example; the message is the Problem's reason."""


# -- reading ----------------------------------------------------------------------------------------


def read_dataset(path: Path | str, tokenizer: Tokenizer, max_len: int) -> DataReport:
    """Read every line of a JSONL file. Bad lines become Problems (reading goes on); blank lines are
    skipped. A file that cannot be opened, is not UTF-8 or holds no data raises LoadError."""
    path = Path(path)
    examples: list[Example] = []
    problems: list[Problem] = []
    kinds: set[str] = set()
    lines = 0
    for number, text in _lines(path):
        lines += 1
        try:
            kind, record = _record(text)
            kinds.add(kind)
            tokens, mask = _tokenize(kind, record, tokenizer)
            _check_example(tokens, mask, max_len)
        except _Skip as exc:
            problems.append(Problem(number, str(exc)))
            continue
        examples.append(Example(number, tokens, mask))
    if lines == 0:
        raise LoadError(path, "no data: the file is empty or holds only blank lines")
    kind = "mixed" if len(kinds) > 1 else next(iter(kinds), "none")
    return DataReport(
        path, kind, examples, problems, sum(len(e.tokens) for e in examples), sum(sum(e.mask) for e in examples)
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each non-blank line. Split at "\\n" only: JSON strings may hold
    U+2028 and other characters that str.splitlines would break at."""
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise LoadError(path, f"line {number} is not UTF-8 (byte {exc.start + 1} of the line)") from None
                text = text.removeprefix("\ufeff") if number == 1 else text
                if text.strip():
                    yield number, text
    except FileNotFoundError:
        raise LoadError(path, "does not exist") from None
    except OSError as exc:
        raise LoadError(path, f"cannot read: {exc.strerror or exc}") from exc


def _record(text: str) -> tuple[str, dict[str, Any]]:
    """The parsed line and its kind, "instruct" or "pretrain"."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Skip(f"bad JSON: {exc.msg} (column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # over-long integers, nesting deeper than the stack
        raise _Skip(f"bad JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(record, dict):
        raise _Skip(f"expected a JSON object, found {_type(record)}")
    if "messages" in record and "text" in record:
        raise _Skip("both 'messages' and 'text': a line is either instruct or pretrain data")
    if "messages" in record:
        return "instruct", record
    if "text" in record:
        return "pretrain", record
    raise _Skip(f"neither 'messages' nor 'text' (keys: {', '.join(map(str, record)) or 'none'})")


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_example(tokens: list[int], mask: list[bool], max_len: int) -> None:
    if len(tokens) > max_len:
        raise _Skip(f"{len(tokens)} tokens, over the sequence length {max_len}")
    if not any(mask[1:]):  # the first token is never predicted
        raise _Skip("no token to train on")


def _tokenize(kind: str, record: dict[str, Any], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    try:
        if kind == "pretrain":
            return _pretrain(record["text"], tokenizer)
        messages, trained = _messages(record["messages"])
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise _Skip(f"'tools' is not a list (found {_type(tools)})")
        if isinstance(tokenizer, MistralCommonTokenizer):
            return _mistral_tokens(tokenizer, messages, trained, tools)
        return _template_tokens(tokenizer, messages, trained, tools)
    except (TemplateError, TokenizerError) as exc:
        raise _Skip(str(exc)) from None


def _pretrain(text: Any, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    if not isinstance(text, str):
        raise _Skip(f"'text' is not a string (found {_type(text)})")
    tokens = tokenizer.encode(text, add_bos=tokenizer.default_add_bos)  # BOS where completions start with one
    tokens += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return tokens, [True] * len(tokens)


# -- messages ---------------------------------------------------------------------------------------


def _messages(value: Any) -> tuple[list[Message], list[bool]]:
    """Checked messages (without mistral-finetune's `weight`) and whether each one is trained."""
    if not isinstance(value, list):
        raise _Skip(f"'messages' is not a list (found {_type(value)})")
    if not value:
        raise _Skip("'messages' is empty")
    checked = [_message(message, number) for number, message in enumerate(value, 1)]
    roles = [message["role"] for message, _ in checked]
    if "assistant" not in roles:
        raise _Skip("no assistant turn")
    if roles[-1] != "assistant":
        raise _Skip(f"the last message ({len(roles)}) is a {roles[-1]} message; it must be the assistant's")
    if not any(trained for _, trained in checked):
        raise _Skip("every assistant message has weight 0: nothing to train on")
    return [message for message, _ in checked], [trained for _, trained in checked]


def _message(message: Any, number: int) -> tuple[Message, bool]:
    if not isinstance(message, dict):
        raise _Skip(f"message {number} is not an object (found {_type(message)})")
    if "role" not in message:
        raise _Skip(f"message {number} has no 'role'")
    role = message["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise _Skip(f"unknown role {_show(role)} in message {number}")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
        where = "is not a list" if role == "assistant" else f"on a {role} message"
        raise _Skip(f"'tool_calls' of message {number} {where}")
    content = message.get("content")
    if content is None and not tool_calls:
        raise _Skip(f"message {number} ({role}) has no 'content'")
    if content is not None and not isinstance(content, str):
        raise _Skip(f"content of message {number} is not a string (found {_type(content)})")
    weight = message.get("weight", 1)
    if role == "assistant" and (isinstance(weight, bool) or weight not in (0, 1)):
        raise _Skip(f"weight of message {number} must be 0 or 1 (found {_show(weight)})")
    return {k: v for k, v in message.items() if k != "weight"}, role == "assistant" and weight == 1


def _template_tokens(
    tokenizer: Tokenizer,
    messages: list[Message],
    trained: list[bool],
    tools: list[Any] | None,
) -> tuple[list[int], list[bool]]:
    full = tokenizer.encode_chat(messages, add_generation_prompt=False, tools=tools)
    mask = [False] * len(full)
    for index in (i for i, train in enumerate(trained) if train):
        start, end = _assistant_span(tokenizer, messages, index, full, tools)
        mask[start:end] = [True] * (end - start)
    return full, mask


def _assistant_span(
    tokenizer: Tokenizer,
    messages: list[Message],
    index: int,
    full: list[int],
    tools: list[Any] | None,
) -> tuple[int, int]:
    """[start, end) of assistant message `index` in `full`, by prefix differences (module docstring)."""
    before = tokenizer.encode_chat(messages[:index], add_generation_prompt=True, tools=tools)
    upto = tokenizer.encode_chat(messages[: index + 1], add_generation_prompt=False, tools=tools)
    if upto != full[: len(upto)] or before != upto[: len(before)]:
        raise _Skip(
            f"the chat template ({tokenizer.chat_format}) does not encode the conversation as growing "
            f"prefixes, so the tokens of assistant message {index + 1} cannot be located"
        )
    stops = [j for j in range(len(before), len(upto)) if upto[j] in tokenizer.stop_ids]
    if not stops:
        raise _Skip(
            f"the chat template ({tokenizer.chat_format}) ends assistant message {index + 1} with no "
            "stop token: the model would not learn to stop"
        )
    return len(before), stops[-1] + 1


# -- mistral-common ---------------------------------------------------------------------------------


def _mistral_tokens(
    tokenizer: MistralCommonTokenizer,
    messages: list[Message],
    trained: list[bool],
    tools: list[Any] | None,
) -> tuple[list[int], list[bool]]:
    from mistral_common.exceptions import MistralCommonException
    from pydantic import ValidationError

    request = mistral_request(messages, tools)  # TemplateError for messages it cannot represent
    try:  # mistral-common's encoders also validate with asserts and plain exceptions
        pieces, whole = _mistral_pieces(tokenizer, request)
    except (MistralCommonException, ValidationError, ValueError, AssertionError, TypeError, KeyError) as exc:
        raise _Skip(f"mistral-common cannot encode this conversation: {exc}") from None
    weights = [train for message, train in zip(messages, trained) if message["role"] == "assistant"]
    spans = [tokens for tokens, is_assistant in pieces if is_assistant]
    if len(spans) != len(weights):  # the normalizer merged consecutive assistant messages
        if not all(weights):
            raise _Skip("mistral-common merges consecutive assistant messages: their weights cannot differ")
        weights = [True] * len(spans)
    tokens: list[int] = []
    mask: list[bool] = []
    train = iter(weights)
    for piece, is_assistant in pieces:
        tokens += piece
        mask += [is_assistant and next(train)] * len(piece)
    if tokens != whole:
        raise _Skip("mistral-common's per-message encoding differs from its whole-conversation encoding")
    return tokens, mask


def _mistral_pieces(tokenizer: MistralCommonTokenizer, request: Any) -> tuple[list[tuple[list[int], bool]], list[int]]:
    """(tokens, is_assistant) per encoded message, the BOS first, and the whole encoding."""
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator

    mistral = tokenizer._mistral  # MistralCommonTokenizer has no public accessor for it
    instruct = mistral.instruct_tokenizer
    get_validator(instruct.tokenizer.version, ValidationMode.finetuning).validate_request(request)
    normalized = mistral._instruct_request_normalizer.from_chat_completion_request(request)
    pieces = [(list(instruct.start()), False)]
    pieces += [_mistral_message(instruct, normalized, index) for index in range(len(normalized.messages))]
    return pieces, list(instruct.encode_instruct(normalized).tokens)


def _mistral_message(instruct: Any, request: Any, index: int) -> tuple[list[int], bool]:
    """One message encoded as `InstructTokenizerBase.encode_instruct` (mistral-common 1.x) does it."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage

    message = request.messages[index]
    first_user, last_user = instruct.find_first_last_user(request)
    if isinstance(message, AssistantMessage):
        return list(instruct.encode_assistant_message(message, is_before_last_user_message=index < last_user)), True
    if isinstance(message, UserMessage):
        tokens = instruct.encode_user_message(
            message,
            request.available_tools,
            index == last_user,
            index == first_user,
            system_prompt=request.system_prompt,
            force_img_first=True,
            settings=request.settings,
        )[0]
    elif isinstance(message, ToolMessage):
        tokens = instruct.encode_tool_message(message, index < last_user)[0]
    elif isinstance(message, SystemMessage):
        tokens = instruct.encode_system_message(message)[0]
    else:
        raise ValueError(f"unknown message type {type(message).__name__}")
    return list(tokens), False


# -- packing and batches ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A packed batch, all tensors on the CPU, all [B, T] int64 with T the sequence length.

    Example: seq_len 8, one row holding examples a = [5, 6, 7] (mask F T T) and b = [8, 9]
    (mask F T), then padding:

        tokens    = [5, 6, 7, 8, 9, 0, 0, 0]
        targets   = [6, 7, -100, 9, -100, -100, -100, -100]   # token t+1 of the same example
        positions = [0, 1, 2, 0, 1, -1, -1, -1]
        segments  = [0, 0, 0, 1, 1, -1, -1, -1]               # attention stays within a segment
    """

    tokens: torch.Tensor  # inputs, padded with 0
    targets: torch.Tensor  # next-token targets; IGNORE_INDEX without loss, padding, example ends
    positions: torch.Tensor  # restarting at 0 for each packed example; -1 for padding
    segments: torch.Tensor  # example index within the row; -1 for padding


def pack(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """Rows of whole examples, at most `seq_len` tokens each. Best fit, in the given order: an
    example goes to the row with the least room that still holds it (the earliest row on ties),
    else to a new row. Deterministic."""
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (room left, row index) of rows with room, sorted
    for example in examples:
        size = len(example.tokens)
        if size > seq_len:
            raise ConfigError(
                f"the example of line {example.line} has {size} tokens, over the sequence length {seq_len}"
            )
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, index = free.pop(at)
        else:
            room, index = seq_len, len(rows)
            rows.append([])
        rows[index].append(example)
        if room > size:
            bisect.insort(free, (room - size, index))
    return rows


def _row(row: Sequence[Example], seq_len: int) -> tuple[list[int], list[int], list[int], list[int]]:
    tokens, targets = [0] * seq_len, [IGNORE_INDEX] * seq_len
    positions, segments = [-1] * seq_len, [-1] * seq_len
    at = 0
    for segment, example in enumerate(row):
        n = len(example.tokens)
        tokens[at : at + n] = example.tokens
        targets[at : at + n - 1] = [t if m else IGNORE_INDEX for t, m in zip(example.tokens[1:], example.mask[1:])]
        positions[at : at + n] = range(n)
        segments[at : at + n] = [segment] * n
        at += n
    return tokens, targets, positions, segments


def collate(rows: Sequence[Sequence[Example]], seq_len: int) -> Batch:
    """One Batch of packed rows (from `pack`), each padded to `seq_len`."""
    columns = zip(*(_row(row, seq_len) for row in rows))
    tokens, targets, positions, segments = (torch.tensor(c, dtype=torch.int64) for c in columns)  # [B, T] each
    return Batch(tokens, targets, positions, segments)


def _mix(seed: int, epoch: int) -> int:
    """One 64-bit generator seed for (seed, epoch); the odd multiplier keeps seeds apart."""
    return (seed * 0x9E3779B97F4A7C15 + epoch) % 2**64


def batches(examples: Sequence[Example], seq_len: int, batch_size: int, seed: int, epoch: int) -> list[Batch]:
    """Shuffle (torch.Generator seeded by seed and epoch), pack, and group the rows into batches of
    `batch_size` rows (the last one may have fewer). The same arguments give identical batches."""
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"sequence length and batch size must be at least 1 (got {seq_len} and {batch_size})")
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    order = torch.randperm(len(examples), generator=generator).tolist()
    rows = pack([examples[i] for i in order], seq_len)
    return [collate(rows[i : i + batch_size], seq_len) for i in range(0, len(rows), batch_size)]
