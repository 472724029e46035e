"""Decode and prefill speed, load time and peak memory, next to transformers and llama.cpp.

    python benchmarks/decode_speed.py [--model FILE.gguf|HF_FOLDER] [--threads 2] [--engines a,b,...]
    python benchmarks/decode_speed.py --random CONFIG.json --quant bf16 --engines tramontane,transformers-bf16

Engines: tramontane (packed GGUF kernels, file mapped), tramontane-nommap, tramontane-q8 and
tramontane-exact (activations q8 or f32 instead of the default q16), tramontane-f32 (dequantized at
load), transformers-fp32, transformers-bf16, llama.cpp and llama.cpp-nommap (when `llama_cpp` imports in
--llama-python; warmed up before timing). Every measurement is a fresh process, engines alternate over
--rounds rounds (medians reported), so load time and peak RSS (VmHWM) are each engine's own; the decode
roofline (measured bandwidth / bytes a token reads) is printed beside the decode figures. Prints tokens/s
for a 512-token prefill, 256 decoded tokens at batch 1, and aggregate decode at batch 4 and 16 (64 tokens
each, counted after every sequence's first token as the batch-1 figure is, and batch 16's whole generate
with its prompts), with ratios to the first engine; --prefill-tokens, --decode-tokens, --batch-tokens change those
lengths (Mixtral 8x7B at a few tokens per second takes shorter runs). `--random SPEC --quant bf16` writes
random weights as a bfloat16 Hugging Face folder (placeholder tokenizer) and compares the engines on it:
the float-checkpoint figures (tramontane's 16-bit packed rows against transformers bf16).

    python benchmarks/decode_speed.py --types q4_0,q4_k_m,q5_k_m,q6_k,q8_0 --llama-bin DIR [--rounds 2]

The quant types people download, side by side: the model (default SmolLM2) requantized to each type by
llama.cpp's own `DIR/llama-quantize` (ours, `tramontane convert`, where no DIR is given: the types it
writes), then each file measured as above with llama.cpp as `DIR/llama-bench` (its own warm-up run
first; mmap on and off, peak RSS of the process) in place of llama-cpp-python; a summary table of
the ratios and each file's decode roofline at the end. DIR: a llama.cpp build's bin folder (a benchmark
tool, never a dependency)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PREFILL, DECODE, BATCH_TOKENS = 512, 256, 64
LLAMA_BIN: str | None = None  # --llama-bin: llama.cpp's own binaries instead of llama-cpp-python
# --types: llama-quantize's names of the types people download; tramontane convert writes the plain ones
DOWNLOADED = ("q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0")


def set_lengths(prefill: int, decode: int, batch: int) -> None:
    """The run's lengths (flags; a worker gets them from its parent): big models take shorter runs."""
    global PREFILL, DECODE, BATCH_TOKENS
    PREFILL, DECODE, BATCH_TOKENS = prefill, decode, batch


def peak_rss() -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, min(vocab, 30000)) for _ in range(n)]


def run_tramontane(model: str | None, packed: bool, mmap: bool = True) -> dict:
    import torch

    import tramontane
    from tramontane.decoding.sampling import SamplingParams

    t0 = time.perf_counter()
    llm = tramontane.load(model, packed=packed, mmap=mmap)
    load = time.perf_counter() - t0
    vocab = llm.config.vocab_size
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([prompt_ids(vocab, 16)], one)  # warm-up
    t = time.perf_counter()
    llm.generate([prompt_ids(vocab, PREFILL)], one)
    prefill = PREFILL / (time.perf_counter() - t)
    times = [
        time.perf_counter()
        for _ in llm.generate(
            prompt_ids(vocab, 8), SamplingParams(temperature=0, max_tokens=DECODE, ignore_eos=True), stream=True
        )
    ]
    decode = (len(times) - 1) / (times[-1] - times[0])
    batched: dict[str, float | None] = {}
    for b in (4, 16) if BATCH_TOKENS else ():
        params = SamplingParams(temperature=0, max_tokens=BATCH_TOKENS, ignore_eos=True)
        t, tokens, first = time.perf_counter(), 0, {}
        for delta in llm.generate([prompt_ids(vocab, 8, seed=i) for i in range(b)], params, stream=True):
            tokens += len(delta.token_ids)
            first.setdefault(delta.index, (time.perf_counter(), tokens))
        end = time.perf_counter()
        started, before = max(first.values())  # every sequence past its prompt and first token
        batched.update(batch_figures(b, tokens - before, end - started, b * BATCH_TOKENS, end - t))
    del torch
    return {"load_s": load, "prefill": prefill, "decode": decode, **batched}


def batch_figures(b: int, tokens: int, decode_s: float, total: int, wall_s: float) -> dict[str, float]:
    """Batch b's aggregate decode (tokens after each sequence's first, as the batch-1 decode figure
    counts) and the whole generate's tokens over its wall time, prompts and first tokens included."""
    return {f"batch{b}": tokens / decode_s, f"batch{b}_wall": total / wall_s}


class IdTokenizer:
    """Random weights have no vocabulary: token i reads as "<i>"."""

    stop_ids: frozenset[int] = frozenset()

    def decode(self, ids, skip_special: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)

    def incremental_decoder(self):
        tok = self

        class Decoder:
            def push(self, i: int) -> str:
                return tok.decode([i])

            def flush(self) -> str:
                return ""

        return Decoder()


def memory_bandwidth() -> float:
    """Bytes per second of summing a 512 MiB tensor, the bound decoding cannot beat: the median of 5
    (a single best run picks up the host's occasional bursts, which no decode step can count on). The
    tensor lies on huge pages, as the packed weights do (quant/pages.py): on 4 KiB pages the sum read
    10% slower, a bound below what the weights' reading reaches."""
    import torch

    from tramontane.quant.pages import huge_empty

    x = huge_empty(4 << 27).view(torch.float32)  # 512 MiB of float32: far beyond the caches
    x.fill_(1.0)  # pages touched once
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)


def active_weight_bytes(model) -> int:
    """Bytes of weights one decoded token reads: everything but the embedding table (one row of it), and
    of Mixtral's experts only the top-k of E each layer routes to (the roofline's denominator)."""
    moe = model.config.moe
    share = moe.num_experts_per_tok / moe.num_experts if moe else 1.0
    total = 0.0
    for name, b in model.state_dict().items():
        if name.startswith("tok_embeddings"):
            continue
        expert = moe is not None and ".feed_forward.w" in name
        total += b.numel() * b.element_size() * (share if expert else 1.0)
    return int(total)


def run_random(spec: str, quant: str | None) -> dict:
    import torch

    from tramontane.build.random import random_model
    from tramontane.decoding.offline import Generator
    from tramontane.decoding.sampling import SamplingParams
    from tramontane.weights.random import random_config

    t0 = time.perf_counter()
    model = random_model(random_config(spec), quant=quant)
    load = time.perf_counter() - t0
    weight_bytes = active_weight_bytes(model)
    from tramontane.build import select_backend
    from tramontane.model import KVCache

    backend = select_backend(model, KVCache, torch.float32)  # as tramontane.load picks it
    print(f"decode backend: {backend.name}", file=sys.stderr)
    gen = Generator(model, IdTokenizer(), backend)
    vocab, n = model.config.vocab_size, 32
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    list(gen.run([prompt_ids(vocab, 4)], [one]))
    t = time.perf_counter()
    list(gen.run([prompt_ids(vocab, 64)], [one]))
    prefill = 64 / (time.perf_counter() - t)
    times = [
        time.perf_counter()
        for _ in gen.run([prompt_ids(vocab, 8)], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)])
    ]
    decode = (len(times) - 1) / (times[-1] - times[0])
    del torch
    return {
        "load_s": load,
        "prefill": prefill,
        "decode": decode,
        "batch4": None,
        "batch16": None,
        "weights_gb": weight_bytes / 1e9,
    }


def placeholder_vocabulary(size: int) -> dict:
    """A SentencePiece-style GGUF vocabulary of `size` made-up pieces (random weights have no real one):
    <unk>, <s>, </s>, the 256 byte tokens, then "▁p3", "▁p4", ... Enough for llama.cpp to load the file."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581p{i}" for i in range(len(pieces), size)]
    types = [2, 3, 3] + [6] * 256 + [1] * (size - 259)  # unknown, control, byte, normal
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": [-float(i) for i in range(size)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def write_random_hf(spec: str, folder: str) -> None:
    """Random weights of `spec` shapes as a bfloat16 Hugging Face folder, with a tokenizer.json of
    placeholder pieces ("p0", "p1", ...; random weights have no real vocabulary) so that both engines load
    it as users' checkpoints load."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tramontane.build.random import random_model
    from tramontane.weights.hf_writer import write_hf
    from tramontane.weights.random import random_config

    model = random_model(random_config(spec)).to(torch.bfloat16)
    write_hf(model, folder)
    vocab = {f"p{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="p0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))


GGUF_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def write_random_gguf(spec: str, quant: str | None, path: str) -> None:
    """Random weights of `spec` shapes written as a GGUF file both engines can load: a GGUF type writes
    random valid blocks one tensor at a time (any size: Mixtral 8x7B as Q3_K is ~20 GB); int8/int4 build
    the model in memory first (random_model) and write it."""
    from tramontane.build.random import random_model
    from tramontane.weights.gguf_writer import write_gguf
    from tramontane.weights.random import random_config

    if quant in GGUF_TYPES:
        from tramontane.weights.random_gguf import write_random_gguf as write_blocks

        config = random_config(spec)
        write_blocks(config, quant, path, placeholder_vocabulary(config.vocab_size))
        return
    model = random_model(random_config(spec), quant=quant)
    write_gguf(model, path, placeholder_vocabulary(model.config.vocab_size), name=f"random {spec}")


def run_transformers(model: str, dtype_name: str) -> dict:
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    path = Path(model)
    t0 = time.perf_counter()
    if path.is_dir():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    load = time.perf_counter() - t0
    vocab = hf.config.vocab_size
    with torch.inference_mode():
        hf(torch.tensor([prompt_ids(vocab, 16)]))
        t = time.perf_counter()
        hf(torch.tensor([prompt_ids(vocab, PREFILL)]))
        prefill = PREFILL / (time.perf_counter() - t)
        ids = torch.tensor([prompt_ids(vocab, 8)])
        kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=DECODE, min_new_tokens=DECODE, **kw)
        decode = (DECODE - 1) / (time.perf_counter() - t - first)
        batched: dict[str, float | None] = {}
        for b in (4, 16) if BATCH_TOKENS else ():
            ids = torch.tensor([prompt_ids(vocab, 8, seed=i) for i in range(b)])
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            first = time.perf_counter() - t
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=BATCH_TOKENS, min_new_tokens=BATCH_TOKENS, **kw)
            wall = time.perf_counter() - t
            batched.update(batch_figures(b, b * (BATCH_TOKENS - 1), wall - first, b * BATCH_TOKENS, wall))
    return {"load_s": load, "prefill": prefill, "decode": decode, **batched}


def run_llama_cpp(model: str, threads: int, mmap: bool = True) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_threads=threads, n_ctx=2048, n_batch=512, use_mmap=mmap, verbose=False)
    load = time.perf_counter() - t0
    vocab = llm.n_vocab()
    llm.eval(prompt_ids(vocab, 16))  # warm-up: a short prompt and a few decoded tokens, then a clean context
    for _ in range(4):
        llm.eval([llm.sample(top_k=1)])
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt_ids(vocab, PREFILL))
    prefill = PREFILL / (time.perf_counter() - t)
    llm.reset()
    llm.eval(prompt_ids(vocab, 8))
    t = time.perf_counter()
    for _ in range(DECODE):
        token = llm.sample(top_k=1)
        llm.eval([token])
    decode = DECODE / (time.perf_counter() - t)
    return {"load_s": load, "prefill": prefill, "decode": decode, "batch4": None, "batch16": None}


def run_llama_bench(bench: str, model: str, threads: int, mmap: bool) -> dict:
    """llama.cpp's own benchmark on `model` (its warm-up run first, one timed repetition of each test);
    peak RSS is the child's."""
    import resource

    cmd = [bench, "-m", model, "-t", str(threads), "-p", str(PREFILL), "-n", str(DECODE), "-r", "1"]
    proc = subprocess.run(
        [*cmd, "--load-mode", "mmap" if mmap else "none", "-o", "json"], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: failed\n{proc.stderr[-1500:]}")
    tests = json.loads(proc.stdout)
    prefill = next(t["avg_ts"] for t in tests if t["n_prompt"] and not t["n_gen"])
    decode = next(t["avg_ts"] for t in tests if t["n_gen"] and not t["n_prompt"])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"load_s": None, "prefill": prefill, "decode": decode, "batch4": None, "batch16": None, "peak_rss": rss}


def worker(engine: str, model: str | None, threads: int, random: str | None = None, quant: str | None = None) -> None:
    if engine.startswith("llama.cpp") and LLAMA_BIN:
        out = run_llama_bench(os.path.join(LLAMA_BIN, "llama-bench"), str(model), threads, engine != "llama.cpp-nommap")
        out["peak_rss_gb"] = out.pop("peak_rss") / 1e9
        print(json.dumps(out))
        return
    if engine.startswith("llama.cpp"):  # may run under another interpreter (--llama-python): no torch there
        out = run_llama_cpp(str(model), threads, mmap=engine != "llama.cpp-nommap")
        out["peak_rss_gb"] = peak_rss() / 1e9
        print(json.dumps(out))
        return
    import torch

    torch.set_num_threads(threads)
    if random:
        out = run_random(random, quant)
    elif engine == "tramontane":
        out = run_tramontane(model, packed=True)
    elif engine == "tramontane-nommap":
        out = run_tramontane(model, packed=True, mmap=False)
    elif engine in ("tramontane-q8", "tramontane-exact"):  # another activations setting (default: q16)
        from tramontane.quant import kernels

        kernels.set_activations("q8" if engine == "tramontane-q8" else "f32")
        out = run_tramontane(model, packed=True)
    elif engine == "tramontane-f32":
        out = run_tramontane(model, packed=False)
    elif engine.startswith("transformers-"):
        out = run_transformers(model, {"fp32": "float32", "bf16": "bfloat16"}[engine.split("-")[1]])
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    out["peak_rss_gb"] = peak_rss() / 1e9
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="tramontane,tramontane-f32,transformers-fp32,transformers-bf16,llama.cpp")
    ap.add_argument(
        "--random",
        default=None,
        metavar="mistral-7b|mixtral-8x7b|CONFIG.json",
        help="random weights of these shapes instead of a file (tramontane only)",
    )
    ap.add_argument(
        "--quant",
        default=None,
        choices=("int8", "int4", "bf16", *GGUF_TYPES),
        help="with --random: int8/int4 quantize in memory; a GGUF type writes a GGUF file of random valid "
        "blocks (to --write-gguf, default /tmp/random-SPEC-TYPE.gguf) and compares the engines on it; bf16 "
        "writes a bfloat16 Hugging Face folder (/tmp/random-SPEC-bf16) and compares the engines on it",
    )
    ap.add_argument(
        "--write-gguf",
        default=None,
        metavar="FILE.gguf",
        help="with --random: write the random model to this GGUF file (placeholder vocabulary) "
        "and compare the engines on it",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every engine, interleaved (medians)")
    ap.add_argument(
        "--llama-python",
        default=sys.executable,
        help="the Python that has llama_cpp (llama-cpp-python: a benchmark tool, never a dependency)",
    )
    ap.add_argument("--prefill-tokens", type=int, default=PREFILL, help="prompt length of the prefill figure")
    ap.add_argument("--decode-tokens", type=int, default=DECODE, help="tokens decoded at batch 1")
    ap.add_argument(
        "--batch-tokens", type=int, default=BATCH_TOKENS, help="tokens per sequence at batch 4 and 16 (0: skip)"
    )
    ap.add_argument(
        "--types",
        default=None,
        help=f"comma-separated quant types (e.g. {','.join(DOWNLOADED)}): the model requantized to each, "
        "every file measured, a summary of the ratios to llama.cpp",
    )
    ap.add_argument(
        "--llama-bin",
        default=None,
        metavar="DIR",
        help="a llama.cpp build's bin folder: llama.cpp engines run its llama-bench, --types its llama-quantize",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global LLAMA_BIN
    LLAMA_BIN = args.llama_bin
    set_lengths(args.prefill_tokens, args.decode_tokens, args.batch_tokens)
    lengths = [f"--{k}-tokens={v}" for k, v in (("prefill", PREFILL), ("decode", DECODE), ("batch", BATCH_TOKENS))]
    lengths += ["--llama-bin", LLAMA_BIN] if LLAMA_BIN else []
    if args.types and not args.worker:
        compare_types(args, lengths)
        return
    if args.random and args.quant == "bf16":
        folder = f"/tmp/random-{os.path.basename(args.random).removesuffix('.json')}-bf16"
        if not os.path.exists(os.path.join(folder, "config.json")):
            write_random_hf(args.random, folder)
        args.model, args.random = folder, None
    if args.random and args.quant in GGUF_TYPES and not args.write_gguf:
        args.write_gguf = f"/tmp/random-{os.path.basename(args.random).removesuffix('.json')}-{args.quant}.gguf"
    if args.random and args.write_gguf:
        if not os.path.exists(args.write_gguf):
            t = time.perf_counter()
            write_random_gguf(args.random, args.quant, args.write_gguf)
            print(f"wrote {args.write_gguf} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        args.model, args.random = args.write_gguf, None
    if args.random:
        if args.worker:
            worker(args.worker, None, args.threads, args.random, args.quant)
            return
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                "random",
                "--random",
                args.random,
                *(["--quant", args.quant] if args.quant else []),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        # measured here, not in the worker: the probe's buffer must not count in the model's peak RSS
        import torch

        torch.set_num_threads(args.threads)
        bandwidth = memory_bandwidth()
        r["bandwidth_gbs"], r["roofline"] = bandwidth / 1e9, bandwidth / (r["weights_gb"] * 1e9)
        r["roofline_share"] = r["decode"] / r["roofline"]
        print(f"\nrandom {args.random}, quant {args.quant or 'none (float32)'}, {args.threads} threads")
        print(
            "| build s | prefill 64 tok/s | decode tok/s | weights GB | bandwidth GB/s | roofline tok/s "
            "| share of roofline | peak RSS GB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| {r['load_s']:.1f} | {r['prefill']:.2f} | {r['decode']:.2f} | {r['weights_gb']:.2f} "
            f"| {r['bandwidth_gbs']:.1f} | {r['roofline']:.2f} | {r['roofline_share']:.0%} | {r['peak_rss_gb']:.2f} |"
        )
        return
    if args.model is None:
        from tramontane.hub.resolve import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        worker(args.worker, args.model, args.threads)
        return
    results = measure(args, args.engines.split(","), lengths)
    print_table(args, results)
    print_roofline(args, results)


def measure(args: argparse.Namespace, engines: list[str], lengths: list[str]) -> dict:
    """Every engine once per round on args.model (interleaved, a fresh process each time): medians."""
    if not LLAMA_BIN and not _llama_importable(args.llama_python):
        engines = [e for e in engines if not e.startswith("llama.cpp")]
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    import torch

    torch.set_num_threads(args.threads)
    active = active_bytes_of_file(args.model)
    for _ in range(args.rounds):  # interleaved: every engine once per round, a fresh process each time
        for engine in engines:
            bandwidth = memory_bandwidth()  # this minute's: the host's moved 30-57 GB/s within an hour
            python = args.llama_python if engine.startswith("llama.cpp") and not LLAMA_BIN else sys.executable
            proc = subprocess.run(
                [python, __file__, "--worker", engine, "--model", args.model, "--threads", str(args.threads), *lengths],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            if proc.returncode:
                print(f"{engine}: failed\n{proc.stderr[-1500:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["bandwidth_gbs"], r["roofline_share"] = bandwidth / 1e9, r["decode"] * active / bandwidth
            runs[engine].append(r)
    return {e: _medians(r) for e, r in runs.items() if r}


def requantized(source: str, qtype: str) -> str:
    """`source` requantized to `qtype` next to /tmp (made once): by llama.cpp's llama-quantize under
    --llama-bin, else by tramontane convert (the plain block types it writes)."""
    stem = os.path.basename(source).split(".")[0]
    out = f"/tmp/{stem}-{qtype}.gguf"
    if os.path.exists(out):
        return out
    if LLAMA_BIN:
        cmd = [os.path.join(LLAMA_BIN, "llama-quantize"), "--allow-requantize", source, out, qtype.upper(), "2"]
    else:
        cmd = [sys.executable, "-m", "tramontane", "convert", source, "--to", "gguf", "--quant", qtype, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: failed\n{proc.stderr[-1500:]}")
    return out


def compare_types(args: argparse.Namespace, lengths: list[str]) -> None:
    """--types: each requantized file measured (tramontane against llama.cpp, mmap on and off), then one
    summary row per type: the ratios and the share of the decode roofline."""
    if args.model is None:
        from tramontane.hub.resolve import default_model_path

        args.model = str(default_model_path())
    source, rows = args.model, []  # (type, results)
    engines = ["tramontane", "llama.cpp", "llama.cpp-nommap"]
    for qtype in args.types.split(","):
        args.model = requantized(source, qtype)
        results = measure(args, engines, lengths)
        print_table(args, results)
        print_roofline(args, results)
        rows.append((qtype, results))
    print(f"\nsummary: {source} requantized, {args.threads} threads, medians of {args.rounds} rounds")
    print(
        "| type | decode ours / llama.cpp (no mmap) | prefill ours / llama.cpp (no mmap) | decode, share of roofline |"
    )
    print("|---|---|---|---|")
    for qtype, r in rows:
        ours, mm, nm = (r.get(e, {}) for e in engines)
        decode = f"{_ratio(ours, mm, 'decode')} ({_ratio(ours, nm, 'decode')})"
        prefill = f"{_ratio(ours, mm, 'prefill')} ({_ratio(ours, nm, 'prefill')})"
        share = f"{ours['decode']:.1f} tok/s, {ours['roofline_share']:.0%}" if ours.get("decode") else "-"
        print(f"| {qtype} | {decode} | {prefill} | {share} |")


def _ratio(ours: dict, other: dict, key: str) -> str:
    return f"{ours[key] / other[key]:.2f}x" if ours.get(key) and other.get(key) else "-"


def _llama_importable(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    return probe.returncode == 0


def _medians(runs: list[dict]) -> dict:
    """Per key, the median over the rounds (None stays None); decode's range as decode_range."""
    import statistics

    out: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    decodes = [r["decode"] for r in runs]
    out["decode_range"] = (min(decodes), max(decodes))
    return out


def active_bytes_of_file(path: str) -> int:
    """Bytes one decoded token reads from a GGUF file: every tensor but the embedding table (unless the
    head is tied to it: no output tensor, the head reads the table whole), and of Mixtral's `*_exps`
    stacks the share the router picks (expert_used_count of expert_count). A Hugging Face folder: its
    safetensors the same way (lm_head, or the embedding it is tied to)."""
    from tramontane.weights.gguf import open_gguf

    if os.path.isdir(path):
        from pathlib import Path

        from tramontane.weights.safetensors import SafetensorsFile

        sizes: dict[str, int] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            with SafetensorsFile(file) as st:
                sizes |= {n: e.nbytes for n, e in st.tensors.items()}
        tied = not any("lm_head" in n for n in sizes)
        return sum(b for n, b in sizes.items() if tied or "embed_tokens" not in n)

    with open_gguf(path) as f:
        meta = f.metadata
        arch = meta.get("general.architecture", "llama")
        experts, used = meta.get(f"{arch}.expert_count", 0), meta.get(f"{arch}.expert_used_count", 0)
        total, tied = 0.0, "output.weight" not in f.tensors
        for name, info in f.tensors.items():
            if name.startswith("token_embd") and not tied:
                continue
            total += info.nbytes * (used / experts if experts and "_exps" in name else 1.0)
    return int(total)


def print_roofline(args: argparse.Namespace, results: dict) -> None:
    """Each engine's decode next to the roofline of the minute it ran in (`measure` probes the bandwidth
    just before each run): the median of its runs' shares."""
    if not results:  # every engine failed (measure said why)
        return
    active = active_bytes_of_file(args.model)
    bandwidth = statistics.median(r["bandwidth_gbs"] for r in results.values()) * 1e9
    roofline = bandwidth / active
    print(
        f"\nbandwidth {bandwidth / 1e9:.1f} GB/s (summing 512 MiB on huge pages, {args.threads} threads, before "
        f"each run; medians); a token reads {active / 1e9:.3f} GB; roofline {roofline:.1f} tok/s"
    )
    for engine, r in results.items():
        lo, hi = r["decode_range"]
        print(
            f"- {engine}: decode {r['decode']:.1f} tok/s ({lo:.1f}-{hi:.1f}), {r['roofline_share']:.0%} of the "
            f"roofline of its minute ({r['bandwidth_gbs']:.1f} GB/s)"
        )


def print_table(args: argparse.Namespace, results: dict) -> None:
    base = next(iter(results.values()), None)
    cols = [
        ("prefill", "prefill tok/s"),
        ("decode", "decode tok/s"),
        ("batch4", "batch 4 tok/s"),
        ("batch16", "batch 16 tok/s"),
        ("batch16_wall", "batch 16 with prompts tok/s"),
        ("load_s", "load s"),
        ("peak_rss_gb", "peak RSS GB"),
    ]
    print(
        f"\nmodel: {args.model}, {args.threads} threads, prefill {PREFILL} tokens, decode {DECODE}; "
        f"ratios are to {next(iter(results), '-')}"
    )
    print("| engine | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for engine, r in results.items():
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if v is None:
                cells.append("-")
            elif engine == next(iter(results)):
                cells.append(f"{v:.2f}" if key in ("load_s", "peak_rss_gb") else f"{v:.1f}")
            else:
                ratio = v / base[key] if base and base.get(key) else float("nan")
                cells.append(
                    f"{v:.2f} ({ratio:.2f}x)" if key in ("load_s", "peak_rss_gb") else f"{v:.1f} ({ratio:.2f}x)"
                )
        print(f"| {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
