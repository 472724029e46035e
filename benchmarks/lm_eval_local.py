"""lm-eval-harness against `tramontane serve`: a small local multiple-choice task through the
`local-completions` model type (echo + logprobs log-likelihoods), next to `tramontane eval --choice`.

    pip install "lm-eval[api]"        # a benchmark dependency, not a test one
    python benchmarks/lm_eval_local.py [--model MODEL]

Writes the task (YAML + JSONL, no download) to a temporary folder, starts a server on a free port,
runs `lm-eval run --model local-completions --tasks tramontane_mc --include_path FOLDER`, and prints
lm-eval's table and tramontane's own accuracy on the same items."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ITEMS = [  # question, choices, index of the answer
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("The capital of Italy is", ["Lisbon", "Rome", "Vienna", "Oslo"], 1),
    ("Water freezes at a temperature of", ["100 degrees Celsius", "50 degrees Celsius", "0 degrees Celsius"], 2),
    ("The largest planet of the solar system is", ["Mercury", "Jupiter", "Mars"], 1),
    ("Two plus two equals", ["four", "seven", "eleven"], 0),
    ("The opposite of hot is", ["cold", "loud", "green"], 0),
    ("A week has", ["seven days", "three days", "twelve days"], 0),
    ("The sun rises in the", ["east", "north", "basement"], 0),
    ("Bees make", ["honey", "steel", "glass"], 0),
    ("The color of a clear daytime sky is", ["blue", "black", "orange"], 0),
    ("The chemical symbol for gold is", ["Ag", "Au", "Fe"], 1),
    ("The mistral is a wind that blows in", ["southern France", "Antarctica", "the Sahara"], 0),
    ("A triangle has", ["three sides", "five sides", "eight sides"], 0),
    ("The author of Romeo and Juliet is", ["Shakespeare", "Newton", "Picasso"], 0),
    ("Ice is the solid form of", ["water", "iron", "air"], 0),
    ("The number after nine is", ["ten", "six", "twenty"], 0),
]
TASK = """task: tramontane_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the default model, SmolLM2)")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "items.jsonl"
        data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in ITEMS))
        (folder / "tramontane_mc.yaml").write_text(TASK.format(data=data))
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tramontane",
                "serve",
                *([args.model] if args.model else []),
                "--port",
                str(port),
                "--served-model-name",
                "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "serve.log", "w"),
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.3)
            start = time.monotonic()
            subprocess.run(
                [
                    str(bin_dir / "lm_eval"),
                    "run",
                    "--model",
                    "local-completions",
                    "--model_args",
                    f"model=local,base_url={base}/v1/completions,num_concurrent=1,max_retries=1",
                    "--tasks",
                    "tramontane_mc",
                    "--include_path",
                    str(folder),
                ],
                check=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
            )
            print(f"lm-eval: {time.monotonic() - start:.1f} s")
        finally:
            server.terminate()
            server.wait(60)
        own = subprocess.run(
            [sys.executable, "-m", "tramontane", "eval", *([args.model] if args.model else []), "--choice", str(data)],
            check=True,
            capture_output=True,
            text=True,
        )
        print(f"tramontane eval --choice: {own.stdout.strip()}")


if __name__ == "__main__":
    main()
