"""Coverage-guided fuzzing of the safetensors reader with atheris (libFuzzer); see README.md.

python fuzz/fuzz_safetensors.py fuzz/corpus/safetensors -max_total_time=1200 -timeout=2 -rss_limit_mb=2048"""

import sys

import atheris

with atheris.instrument_imports(include=["tramontane"]):
    from targets import safetensors_input


if __name__ == "__main__":
    atheris.Setup(sys.argv, safetensors_input)
    atheris.Fuzz()
