"""The `tramontane` command: run, chat, show, serve, eval (and finetune, merge: cli_train.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import TramontaneError
from ..hub.modelfile import ModelSettings
from .help import MODEL_HELP, Parser, add_command, add_model_argument, unknown_flags
from .model import add_model_parsers, add_store_parsers, cmd_convert, cmd_create, cmd_list, cmd_pull, cmd_rm
from .train import add_train_parsers, cmd_finetune, cmd_merge

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_DTYPES = ("auto", "f32", "bf16", "f16", "q8_0")  # model/kv_types.py KV_TYPES (not imported: no torch for --help)


# The sampling flags' defaults where neither the flag nor the model's Modelfile (a created model's
# PARAMETERs, hub/modelfile.py) sets a value; temperature's is the command's own.
SAMPLING_DEFAULTS = {
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def _sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    p.set_defaults(default_temperature=temperature)
    g.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default {temperature:g})")
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="sample from the smallest set of tokens whose probabilities "
        "add up to this (nucleus sampling; default 1 = off)",
    )
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default 0 = off)")
    g.add_argument(
        "--min-p",
        type=float,
        default=None,
        help="drop tokens less likely than this times the most likely one (default 0 = off)",
    )
    g.add_argument(
        "--repetition-penalty",
        "--repeat-penalty",
        type=float,
        default=None,
        help="make tokens already in the prompt or answer this much less likely (CTRL's rule: positive logits "
        "divided by it, negative ones multiplied; default 1 = off; 1.1 is common)",
    )
    g.add_argument(
        "--presence-penalty",
        type=float,
        default=None,
        help="subtract this from the logits of tokens already in the answer, -2..2 (default 0)",
    )
    g.add_argument(
        "--frequency-penalty",
        type=float,
        default=None,
        help="subtract this times each token's count in the answer from its logit, -2..2 (default 0)",
    )
    g.add_argument("--seed", type=int, default=None, help="makes sampling repeat exactly")
    g.add_argument("--max-tokens", type=int, default=None, help="default: until the context is full")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--json", action="store_true", help="answer with a JSON object (constrained decoding)")
    g.add_argument("--schema", default=None, metavar="FILE", help="answer with JSON following this JSON schema")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype (default auto: bfloat16 for float checkpoints where the CPU supports it)",
    )
    p.add_argument(
        "--quant",
        choices=("int8", "int4"),
        default=None,
        help="weight-only quantization of float matrices after loading (int8: Q8_0, int4: Q4_1; groups of 32)",
    )
    _mmap_flag(p)
    _exact_flag(p)
    _kv_dtype_flag(p)
    _lora_flag(p)
    p.add_argument(
        "--adapter", default=None, metavar="NAME", help="which --lora adapter answers (default: the only one given)"
    )
    _parallel_flag(p)


def _mmap_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-mmap",
        dest="mmap",
        action="store_false",
        help="copy a GGUF file's packed weights into memory instead of reading them from the mapped file "
        "as they are first used (the default: quick loads, and only the experts a token uses are read)",
    )


def _kv_dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default="auto",
        help="how the KV cache stores keys and values: f32, bf16, f16, or q8_0 (34 bytes per 32 values, "
        "as llama.cpp's -ctk/-ctv q8_0: 0.27x f32's memory; perplexity within 0.5%% on SmolLM2); default "
        "auto: the compute dtype (float32 for GGUF files)",
    )


def _exact_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--activations",
        choices=("q16", "q8", "f32"),
        default=None,
        help="activations of the packed matmuls of Q2_K..Q6_K, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights: "
        "q16 (the default: rounded to two int8 parts for integer dot products, within 1/32512 of each "
        "block's largest value), q8 (one int8 part, as llama.cpp: fastest, answers drift from the exact "
        "path's sooner) or f32 (float32, the exact path)",
    )
    p.add_argument("--exact", action="store_true", help="--activations f32: float32 results bit for bit")


def _apply_exact(ns: argparse.Namespace) -> None:
    """--exact / --activations: in this process and in those it starts (the environment variable the
    kernels read when they are imported)."""
    wanted = "f32" if getattr(ns, "exact", False) else getattr(ns, "activations", None)
    if wanted:
        os.environ["TRAMONTANE_ACTIVATIONS"] = wanted
        if "tramontane.quant.kernels" in sys.modules:
            sys.modules["tramontane.quant.kernels"].set_activations(wanted)


def _parallel_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parallel",
        choices=("tp", "ep", "tp+ep"),
        default=None,
        help="under torchrun: split the model by tensor parallelism (tp, default), whole experts "
        "per rank (ep, Mixtral) or both (tp+ep)",
    )


def _lora_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="load a LoRA adapter folder (PEFT layout) under NAME (repeatable)",
    )


def parse_loras(specs: list[str], reserved: str | None = None) -> dict[str, str]:
    """--lora NAME=PATH values -> {NAME: PATH}; names are unique, non-empty, without '.' or '/'."""
    loras: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path or "." in name or "/" in name:
            raise TramontaneError(f"--lora takes NAME=PATH with a name without '.' or '/', got {spec!r}")
        if name in loras or name == reserved:
            raise TramontaneError(f"--lora name {name!r} is used twice (or is the served model's name)")
        if not Path(path).expanduser().is_dir():
            raise TramontaneError(f"--lora {name}: {path} is not an adapter folder")
        loras[name] = str(Path(path).expanduser())
    return loras


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="tramontane",
        description="Run, serve, convert and fine-tune Mistral-family open-weight models on your own machine. "
        "`tramontane COMMAND --help` describes each command, with examples.",
    )
    parser.add_argument("--version", action="version", version=f"tramontane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    run = add_command(sub, "run")
    run.add_argument(
        "args", nargs="*", metavar="[MODEL] [PROMPT]", help=f"MODEL: {MODEL_HELP}; PROMPT: the question (or stdin)"
    )
    _sampling_flags(run, temperature=0.0)  # one-shot answers repeat unless asked otherwise
    chat = add_command(sub, "chat")
    add_model_argument(chat)
    _sampling_flags(chat, temperature=0.7)
    add_model_argument(add_command(sub, "show"))
    _serve_flags(add_command(sub, "serve"))
    ev = add_command(sub, "eval")
    add_model_argument(ev)
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--perplexity", type=Path, metavar="FILE", help="a UTF-8 text file")
    what.add_argument(
        "--choice",
        type=Path,
        metavar="FILE",
        help='JSONL: {"question": ..., "choices": [...], "answer": index or text}',
    )
    ev.add_argument("--context", type=int, default=1024, help="tokens per window (default 1024)")
    ev.add_argument("--stride", type=int, default=512, help="tokens between window starts (default 512)")
    ev.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype (default auto: bfloat16 for float "
        "checkpoints where the CPU supports it; float32 for scores comparable with transformers' float32)",
    )
    _kv_dtype_flag(ev)
    add_train_parsers(sub)
    add_model_parsers(sub)
    add_store_parsers(sub)
    return parser


def _serve_flags(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $TRAMONTANE_API_KEY, else no key)",
    )
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the file or folder name)")
    p.add_argument(
        "--kv-cache-memory",
        default="10%",
        help="KV cache size: bytes with K/M/G suffixes (2G) or a percentage of free RAM (default 10%%)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step (default 512)")
    p.add_argument("--max-running", type=int, default=64, help="requests decoded together (default 64)")
    p.add_argument("--max-queued", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='speculative decoding for every request (one may say "speculation": false), as vLLM\'s: by prompt '
        'lookup {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, "prompt_lookup_min": 2} '
        '(copy-heavy work decodes faster), or by a draft model sharing the tokenizer {"model": "PATH", '
        '"num_speculative_tokens": 4}; greedy answers unchanged, sampled ones keep their distribution (a seeded '
        "sampled request does not speculate)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=_count_or_zero,
        default=4096,
        help="tokens a request without max_tokens may generate (default 4096; 0: up to the end of the context)",
    )
    p.add_argument("--max-body-bytes", default="16M", help="largest request body, K/M/G suffixes (default 16M)")
    p.add_argument(
        "--max-file-bytes",
        default="512M",
        help="largest file uploaded to /v1/files (training data, batch requests), K/M/G suffixes (default 512M)",
    )
    p.add_argument("--max-files", type=_positive_int, default=1000, help="files /v1/files keeps at most (default 1000)")
    p.add_argument(
        "--fine-tuning-workers",
        type=_positive_int,
        default=1,
        help="fine-tuning jobs (/v1/fine_tuning/jobs) trained at once, each in its own process (default 1)",
    )
    p.add_argument(
        "--drain-timeout",
        type=_seconds_or_zero,
        default=30.0,
        help="seconds SIGTERM waits for running requests before stopping them (default 30)",
    )
    _connection_flags(p)
    p.add_argument(
        "--allow-request-chat-template",
        action="store_true",
        help="accept a Jinja chat_template in chat requests (rendered in the sandbox; off by default)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name to answer to besides the loopback names (repeatable; needed behind a "
        "proxy or a DNS name when listening on loopback)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from this origin (CORS; repeatable; * for any)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype (default auto: bfloat16 for float checkpoints where the CPU supports it)",
    )
    p.add_argument(
        "--quant",
        choices=("int8", "int4"),
        default=None,
        help="weight-only quantization of float matrices after loading (int8: Q8_0, int4: Q4_1; groups of 32)",
    )
    _mmap_flag(p)
    _exact_flag(p)
    _kv_dtype_flag(p)
    _lora_flag(p)
    _parallel_flag(p)
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="server log level (default warning; info logs every request)",
    )


def _connection_flags(p: argparse.ArgumentParser) -> None:
    from ..serve.connections import ConnectionLimits

    d = ConnectionLimits()
    g = p.add_argument_group("connections")
    g.add_argument(
        "--timeout-head",
        type=_seconds,
        default=d.head_timeout,
        help=f"seconds for a request's headers to arrive whole, from their first byte (default {d.head_timeout:g})",
    )
    g.add_argument(
        "--timeout-body",
        type=_seconds,
        default=d.body_timeout,
        help=f"seconds for a request body to arrive whole (default {d.body_timeout:g})",
    )
    g.add_argument(
        "--timeout-keep-alive",
        type=_seconds,
        default=d.idle_timeout,
        help=f"seconds an open connection may wait without a request (default {d.idle_timeout:g})",
    )
    g.add_argument(
        "--max-connections",
        type=_positive_int,
        default=d.max_connections,
        help=f"open connections in all; one more closes the longest-waiting idle one (default {d.max_connections})",
    )
    g.add_argument(
        "--max-connections-per-client",
        type=_positive_int,
        default=d.max_per_client,
        help=f"open connections from one address (default {d.max_per_client})",
    )


def _seconds(text: str, low: float = 0.0, inclusive: bool = False) -> float:
    """A finite number of seconds above `low` (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (low <= value if inclusive else low < value) or not value < 1e6:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds in {'[' if inclusive else '('}{low:g}, 1e6), got {text!r}"
        )
    return value


def _seconds_or_zero(text: str) -> float:
    return _seconds(text, inclusive=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 < value <= 1 << 20:
        raise argparse.ArgumentTypeError(f"expected a number in 1..{1 << 20}, got {text!r}")
    return value


MIN_KV_CACHE = 1 << 20  # below this no model's KV cache holds a useful number of tokens


SPECULATIVE_KEYS = {"num_speculative_tokens": "num_tokens", "prompt_lookup_max": "ngram_max"}
SPECULATIVE_KEYS["prompt_lookup_min"] = "ngram_min"


def _speculative_json(text: str) -> dict[str, Any]:
    import json

    try:
        config = json.loads(text)
    except ValueError as exc:
        raise TramontaneError(f"--speculative-config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise TramontaneError("--speculative-config must be a JSON object")
    return config


def _speculative_draft(text: str | None) -> str | None:
    """--speculative-config's draft model ("model"), checked to exist; None for prompt lookup."""
    draft = _speculative_json(text).get("model") if text is not None else None
    if draft is None:
        return None
    if not isinstance(draft, str):
        raise TramontaneError("--speculative-config: model is a path or a stored model's name")
    from ..hub.resolve import resolve_model

    resolve_model(draft)  # a clear error now, not once the server has loaded its model
    return draft


def _speculation(text: str | None) -> Any:
    """--speculative-config's JSON (vLLM's keys) as a Speculation by prompt lookup (a draft model is
    loaded with the served one: `_speculative_draft`); None without the flag."""
    if text is None:
        return None
    from ..decoding.speculative import Speculation

    config = _speculative_json(text)
    draft = config.pop("model", None)
    method = config.pop("method", "draft_model" if draft is not None else "ngram")
    allowed = ("draft_model",) if draft is not None else ("ngram", "prompt_lookup")
    if method not in allowed:
        raise TramontaneError(
            f'--speculative-config: method must be "ngram" (prompt lookup), or "draft_model" with a model; got {method!r}'
        )
    unknown = sorted(set(config) - set(SPECULATIVE_KEYS))
    if unknown:
        raise TramontaneError(f"--speculative-config: unknown keys {unknown}; known: {sorted(SPECULATIVE_KEYS)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in config.values()):
        raise TramontaneError("--speculative-config: every value but method is a whole number")
    try:
        return Speculation(**{SPECULATIVE_KEYS[k]: v for k, v in config.items()})
    except TramontaneError as exc:
        raise TramontaneError(f"--speculative-config: {exc}") from None


def _kv_cache_memory(text: str, parse_size: Any) -> int:
    """--kv-cache-memory in bytes, refused at once (before the model loads) when absurdly small."""
    size = parse_size(text, "--kv-cache-memory", allow_percent=True)
    if size < MIN_KV_CACHE:
        raise TramontaneError(f"--kv-cache-memory must be at least 1M, got {text!r} ({size} bytes)")
    return size


def _count_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _looks_like_model(arg: str) -> bool:
    """Whether run's one argument is a MODEL (a path, a .gguf name, a stored model's name) and not a prompt."""
    from ..hub.store import find

    path = Path(arg).expanduser()
    return path.exists() or arg.endswith(".gguf") or find(arg) is not None


def _split_run_args(args: list[str]) -> tuple[str | None, str | None]:
    if len(args) > 2:
        raise TramontaneError(f"run takes at most a MODEL and a PROMPT, got {len(args)} arguments (quote the prompt)")
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1:
        return (args[0], None) if _looks_like_model(args[0]) else (None, args[0])
    return None, None


def _sampling(ns: argparse.Namespace, settings: ModelSettings | None = None):
    """The sampling flags, over the model's Modelfile PARAMETERs, over the defaults."""
    from ..decoding.sampling import SamplingParams
    from ..hub.modelfile import sampling_fields

    model = sampling_fields(settings.parameters) if settings is not None else {}
    chosen = {
        name: value if (value := getattr(ns, name)) is not None else model.get(name, default)
        for name, default in {**SAMPLING_DEFAULTS, "temperature": ns.default_temperature}.items()
    }
    drawn = _seed(ns)  # --seed, else (under torchrun) one rank 0 drew
    return SamplingParams(
        **chosen,
        seed=ns.seed if ns.seed is not None else model.get("seed", drawn),
        max_tokens=ns.max_tokens if ns.max_tokens is not None else model.get("max_tokens"),
        stop=tuple(ns.stop or model.get("stop", ())),
        grammar=_grammar(ns),
    )


def _opening(ns: argparse.Namespace, settings: ModelSettings) -> list[dict[str, Any]]:
    """A chat's first messages: the system prompt (--system, else the Modelfile's SYSTEM) and the
    Modelfile's MESSAGEs."""
    system = ns.system if ns.system is not None else settings.system
    return ([{"role": "system", "content": system}] if system else []) + list(settings.messages)


def _grammar(ns: argparse.Namespace) -> str | None:
    """--json / --schema FILE as a grammar for constrained decoding (None: free text)."""
    import json

    from ..text.grammar import json_grammar

    if ns.schema is None:
        return json_grammar(None) if ns.json else None
    try:
        schema = json.loads(Path(ns.schema).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TramontaneError(f"--schema {ns.schema}: not a readable JSON file: {exc}") from None
    return json_grammar(schema)


def _seed(ns: argparse.Namespace) -> int | None:
    """--seed, or under torchrun one drawn by rank 0 for every rank (they must sample the same tokens)."""
    from ..parallel.dist import is_parallel

    if ns.seed is not None or not is_parallel():
        return ns.seed
    import secrets

    return _shared(secrets.randbits(63))


def _load(model: str | None, ns: argparse.Namespace):
    from ..api import load

    loras = parse_loras(ns.lora)
    if ns.adapter is not None and ns.adapter not in loras:
        raise TramontaneError(f"--adapter {ns.adapter!r} is not one of the --lora names ({', '.join(loras) or 'none'})")
    if ns.adapter is None and len(loras) > 1:
        raise TramontaneError("several --lora adapters: choose the one that answers with --adapter NAME")
    llm = load(
        model,
        dtype=ns.dtype,
        kv_dtype=ns.kv_dtype,
        progress=sys.stderr.isatty() and _leader(),
        quant=ns.quant,
        lora=loras,
        parallel=_parallel_mode(ns),
        mmap=ns.mmap,
    )
    if ns.quant and _leader():
        from ..quant.quantize import summary

        print(f"--quant {ns.quant}: {summary(llm.model)}", file=sys.stderr)
    if loras:
        llm.use_adapter(ns.adapter or next(iter(loras)))
    return llm


def _leader() -> bool:
    """Whether this process talks to the user: always, unless it is a rank > 0 under torchrun."""
    from ..parallel.dist import rank_and_world

    return rank_and_world()[0] == 0


def _parallel_mode(ns: argparse.Namespace) -> str | None:
    from ..parallel.dist import is_parallel

    if not is_parallel():
        if ns.parallel is not None:
            raise TramontaneError("--parallel needs several processes: launch with torchrun --nproc-per-node N")
        return None
    return ns.parallel or "tp"


def _shared(value: Any) -> Any:
    """Rank 0's value on every rank (what only rank 0 read: stdin, a random seed)."""
    from ..parallel.dist import broadcast_object

    return broadcast_object(value)


def _stream_answer(llm: Any, messages: list[dict[str, Any]], params: Any) -> str:
    """Print the answer as it streams (rank 0 only; other ranks compute along); Ctrl-C stops it early,
    and an answer cut at the token limit says so on stderr. Returns the text."""
    pieces: list[str] = []
    show = _leader()
    stream = llm.chat(messages, params, stream=True)
    try:
        for delta in stream:
            pieces.append(delta)
            if show:
                sys.stdout.write(delta)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    if show:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stream.finish_reason == "length":
            print(
                "[length] the answer stopped at the token limit (--max-tokens, or the context's end)", file=sys.stderr
            )
    return "".join(pieces)


def cmd_run(ns: argparse.Namespace) -> int:
    model, prompt = _split_run_args(ns.args)
    if prompt is None:
        prompt = _shared(sys.stdin.read().strip() if _leader() else None)
        if not prompt:
            raise TramontaneError("no prompt given: pass one as an argument or on stdin")
    _sampling(ns)  # a bad flag fails before the model loads
    llm = _load(model, ns)
    _stream_answer(llm, _opening(ns, llm.settings) + [{"role": "user", "content": prompt}], _sampling(ns, llm.settings))
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    llm = _load(ns.model, ns)
    history = _opening(ns, llm.settings)
    leader = _leader()
    interactive = leader and sys.stdin.isatty()
    if interactive:
        print(_banner(ns.model, llm.config), file=sys.stderr)
    while True:
        text = _shared(_read_line(interactive) if leader else None)
        if text is None:
            break
        if text in ("/bye", "/exit", "/quit"):
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        params = _sampling(ns, llm.settings)  # per answer: under torchrun a fresh seed shared by every rank
        history.append({"role": "assistant", "content": _stream_answer(llm, history, params)})
    return 0


def _banner(model: str | None, config: Any) -> str:
    """The chat's first lines: which model (its name, parameters, context length) and how to leave."""
    from ..hub.resolve import DEFAULT_MODEL_FILE

    name = Path(model).name if model else f"{DEFAULT_MODEL_FILE} (the default model)"
    n = config.parameter_count()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    return (
        f"tramontane chat: {name}, {size} parameters, context {config.max_seq_len} tokens\n"
        "Type a message; /bye or Ctrl-D leaves, Ctrl-C stops an answer."
    )


def _read_line(interactive: bool) -> str | None:
    """The next message typed (stripped), "" for an interrupted line, None at the end of input."""
    try:
        return input(">>> " if interactive else "").strip()
    except EOFError:
        return None
    except KeyboardInterrupt:
        print("\nUse Ctrl-D or /bye to leave.", file=sys.stderr)
        return ""


def cmd_show(ns: argparse.Namespace) -> int:
    from ..hub.describe import describe
    from ..hub.resolve import resolve_model

    for key, value in describe(resolve_model(ns.model)).items():
        print(f"{key:<20} {value}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .. import load
    from ..evaluate import choice_accuracy, perplexity, read_choices

    path = ns.perplexity or ns.choice
    if not path.is_file():
        raise TramontaneError(f"{path}: no such file")
    llm = load(ns.model, dtype=ns.dtype, kv_dtype=ns.kv_dtype)
    if ns.perplexity is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise TramontaneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        ids = llm.tokenizer.encode(text, add_bos=llm.tokenizer.default_add_bos)
        result = perplexity(llm, ids, ns.context, ns.stride, progress=True)
        print(
            f"perplexity {result.perplexity:.4f}  (mean NLL {result.nll:.4f} nats over {result.tokens} tokens, "
            f"{result.windows} windows of {ns.context} tokens, stride {ns.stride})"
        )
    else:
        choices = choice_accuracy(llm, read_choices(path), progress=True)
        print(f"accuracy {choices.accuracy:.4f}  acc_norm {choices.accuracy_norm:.4f}  ({choices.items} items)")
    return 0


def _exit_before_serving(signum: int, frame: Any) -> None:
    """SIGTERM / SIGINT before the server has started: nothing to drain, exit at once with status 0."""
    import signal

    print(f"tramontane: {signal.Signals(signum).name} before the server started: exiting", file=sys.stderr, flush=True)
    os._exit(0)


def cmd_serve(ns: argparse.Namespace) -> int:
    import os
    import signal

    signal.signal(signal.SIGTERM, _exit_before_serving)  # uvicorn installs its own (draining) handler at start

    from ..serve.common import FileLimits
    from ..serve.connections import ConnectionLimits
    from ..serve.server import ServeOptions, model_name_of, parse_size, serve

    for flag, value, low in (
        ("--port", ns.port, 0),
        ("--block-size", ns.block_size, 1),
        ("--max-num-batched-tokens", ns.max_num_batched_tokens, 1),
        ("--max-running", ns.max_running, 1),
        ("--max-queued", ns.max_queued, 0),
    ):
        if value < low or (flag == "--port" and value > 65535):
            raise TramontaneError(
                f"{flag} must be {'in 0..65535' if flag == '--port' else f'at least {low}'}, got {value}"
            )
    name = model_name_of(ns.model)  # also checks that the model exists before the server starts
    opts = ServeOptions(
        model=ns.model,
        name=ns.served_model_name or name,
        host=ns.host,
        port=ns.port,
        api_key=ns.api_key if ns.api_key is not None else os.environ.get("TRAMONTANE_API_KEY") or None,
        kv_cache_memory=_kv_cache_memory(ns.kv_cache_memory, parse_size),
        max_queued=ns.max_queued,
        max_running=ns.max_running,
        max_body_bytes=parse_size(ns.max_body_bytes, "--max-body-bytes"),
        block_size=ns.block_size,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        dtype=ns.dtype,
        kv_dtype=ns.kv_dtype,
        quant=ns.quant,
        mmap=ns.mmap,
        drain_timeout=ns.drain_timeout,
        loras=parse_loras(ns.lora, reserved=ns.served_model_name or name),
        allow_origins=ns.allow_origin,
        log_level=ns.log_level,
        parallel=_parallel_mode(ns),
        allow_request_templates=ns.allow_request_chat_template,
        allowed_hosts=ns.allowed_host,
        default_max_tokens=ns.default_max_tokens,
        file_limits=FileLimits(parse_size(ns.max_file_bytes, "--max-file-bytes"), ns.max_files, ns.fine_tuning_workers),
        speculation=_speculation(ns.speculative_config),
        speculative_draft=_speculative_draft(ns.speculative_config),
        limits=ConnectionLimits(
            head_timeout=ns.timeout_head,
            body_timeout=ns.timeout_body,
            idle_timeout=ns.timeout_keep_alive,
            max_connections=ns.max_connections,
            max_per_client=min(ns.max_connections_per_client, ns.max_connections),
        ),
    )
    if not _leader():
        from ..serve.server import follow_leader

        return follow_leader(opts)  # only rank 0 listens; the others compute its steps
    return serve(opts)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with what a command does not take reported by that command's parser (its
    usage, the closest flag it has) rather than by the top-level one."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        unknown_flags(sub.choices[ns.command], extra)
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = _parse(argv)
    _apply_exact(ns)
    commands = {
        "run": cmd_run,
        "chat": cmd_chat,
        "show": cmd_show,
        "serve": cmd_serve,
        "finetune": cmd_finetune,
        "merge": cmd_merge,
        "eval": cmd_eval,
        "convert": cmd_convert,
        "list": cmd_list,
        "rm": cmd_rm,
        "pull": cmd_pull,
        "create": cmd_create,
    }
    # under torchrun: join the group; every rank runs this same command. (Only these commands import
    # torch.distributed: `list`, `rm` and friends answer without loading torch at all.)
    distributed = ns.command in ("run", "chat", "serve")
    joined = False
    if distributed:
        from ..parallel.dist import init_from_env

        joined = init_from_env()
    finished = False
    try:
        code = commands[ns.command](ns)
        finished = True
    except TramontaneError as e:
        print(f"tramontane: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        if distributed:
            from ..parallel.dist import shutdown

            shutdown(barrier=finished)
    if joined:  # skip interpreter teardown: gloo's threads can abort a finishing rank (std::terminate)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
