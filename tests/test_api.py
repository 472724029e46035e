"""The offline API end to end on tiny random models with Mistral's own tokenizer files."""

from __future__ import annotations

import shutil
from pathlib import Path

import mistral_common
import pytest
from models import hf_model, save_hf, save_native

import tramontane
from tramontane.hub.describe import describe

V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory):
    folder = save_native(hf_model("mistral", seed=4, vocab_size=32000), tmp_path_factory.mktemp("native"))
    shutil.copy(V1, folder / "tokenizer.model.v1")
    return folder


def test_native_folder_with_mistral_tokenizer_chats(native_folder):
    llm = tramontane.load(native_folder)
    assert llm.tokenizer.chat_format == "mistral-common v1"
    messages = [{"role": "user", "content": "Bonjour ! [INST] </s>"}]
    streamed = "".join(llm.chat(messages, temperature=0, max_tokens=12, ignore_eos=True, stream=True))
    whole = llm.chat(messages, temperature=0, max_tokens=12, ignore_eos=True)
    assert whole.finish_reason == "length" and len(whole.token_ids) == 12
    assert streamed == whole.text == llm.tokenizer.decode(whole.token_ids)
    prompt = llm.tokenizer.encode_chat(messages)
    assert prompt[0] == llm.tokenizer.bos_id and prompt.count(llm.tokenizer.eos_id) == 0


def test_generate_text_batch_streams_by_index(native_folder):
    llm = tramontane.load(native_folder)
    prompts = ["The mistral blows", "Le vent"]
    whole = llm.generate(prompts, temperature=0, max_tokens=6, ignore_eos=True)
    texts = ["", ""]
    for delta in llm.generate(prompts, temperature=0, max_tokens=6, ignore_eos=True, stream=True):
        texts[delta.index] += delta.text
    assert texts == [c.text for c in whole]
    assert whole[0].prompt_token_ids[0] == llm.tokenizer.bos_id  # Mistral prompts start with BOS


def test_show_describes_native_and_hf_folders(native_folder, tmp_path):
    info = describe(native_folder)
    assert info["format"] == "Mistral native" and info["sliding window"] == "8"
    assert info["rope theta"] == "10000" and info["chat format"] == "mistral-common v1"
    hf = save_hf(hf_model("mixtral", seed=4, vocab_size=32000), tmp_path / "hf", shard=None)
    shutil.copy(V1, hf / "tokenizer.model.v1")
    info = describe(hf)
    assert info["experts"] == "2 of 8 per token" and info["format"] == "Hugging Face safetensors"
    assert (
        info["weight types"] == f"float32 x{3 + 2 * (4 + 2 + 1 + 8 * 3)}"
    )  # per layer: attention, norms, router, experts
