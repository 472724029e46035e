"""Coverage-guided fuzzing of the GGUF reader with atheris (libFuzzer); see README.md.

python fuzz/fuzz_gguf.py fuzz/corpus/gguf -max_total_time=1200 -timeout=2 -rss_limit_mb=2048"""

import sys

import atheris

with atheris.instrument_imports(include=["tramontane"]):
    from targets import gguf_input


if __name__ == "__main__":
    atheris.Setup(sys.argv, gguf_input)
    atheris.Fuzz()
