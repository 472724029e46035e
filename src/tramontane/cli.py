"""The `tramontane` command: run, chat, show."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import TramontaneError

DTYPES = ("float32", "bfloat16", "float16")


def _sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature:g})")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", "--repeat-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling repeat exactly")
    g.add_argument("--max-tokens", type=int, default=None, help="default: until the context is full")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--system", default=None, help="system message")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tramontane", description="Run Mistral-family open-weight models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one question (reads stdin when no prompt is given)")
    run.add_argument("args", nargs="*", metavar="[MODEL] [PROMPT]")
    _sampling_flags(run, temperature=0.0)  # one-shot answers repeat unless asked otherwise
    chat = sub.add_parser("chat", help="interactive multi-turn chat (/bye or Ctrl-D leaves)")
    chat.add_argument("model", nargs="?", default=None, metavar="MODEL")
    _sampling_flags(chat, temperature=0.7)
    show = sub.add_parser("show", help="print a model's architecture")
    show.add_argument("model", nargs="?", default=None, metavar="MODEL")
    return parser


def _looks_like_model(arg: str) -> bool:
    path = Path(arg).expanduser()
    return path.exists() or arg.endswith(".gguf")


def _split_run_args(args: list[str]) -> tuple[str | None, str | None]:
    if len(args) > 2:
        raise TramontaneError(f"run takes at most a MODEL and a PROMPT, got {len(args)} arguments "
                              "(quote the prompt)")
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1:
        return (args[0], None) if _looks_like_model(args[0]) else (None, args[0])
    return None, None


def _sampling(ns: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(
        temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
        repetition_penalty=ns.repetition_penalty, presence_penalty=ns.presence_penalty,
        frequency_penalty=ns.frequency_penalty, seed=ns.seed, max_tokens=ns.max_tokens, stop=tuple(ns.stop))


def _load(model: str | None, ns: argparse.Namespace):
    import torch

    from .api import load

    return load(model, dtype=getattr(torch, ns.dtype), progress=sys.stderr.isatty())


def _stream_answer(llm: Any, messages: list[dict[str, Any]], params: Any) -> str:
    """Print the answer as it streams; Ctrl-C stops it early. Returns the text printed."""
    pieces: list[str] = []
    try:
        for delta in llm.chat(messages, params, stream=True):
            pieces.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def cmd_run(ns: argparse.Namespace) -> int:
    model, prompt = _split_run_args(ns.args)
    if prompt is None:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise TramontaneError("no prompt given: pass one as an argument or on stdin")
    params = _sampling(ns)
    llm = _load(model, ns)
    messages = ([{"role": "system", "content": ns.system}] if ns.system else [])
    _stream_answer(llm, messages + [{"role": "user", "content": prompt}], params)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    params = _sampling(ns)
    llm = _load(ns.model, ns)
    history: list[dict[str, Any]] = [{"role": "system", "content": ns.system}] if ns.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /bye or Ctrl-D leaves, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\nUse Ctrl-D or /bye to leave.", file=sys.stderr)
            continue
        text = line.strip()
        if text in ("/bye", "/exit", "/quit"):
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": _stream_answer(llm, history, params)})
    return 0


def cmd_show(ns: argparse.Namespace) -> int:
    from .resolve import resolve_model
    from .show import describe

    for key, value in describe(resolve_model(ns.model)).items():
        print(f"{key:<20} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "chat": cmd_chat, "show": cmd_show}
    try:
        return commands[ns.command](ns)
    except TramontaneError as e:
        print(f"tramontane: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
