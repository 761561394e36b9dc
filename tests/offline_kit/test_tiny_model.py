"""The embedded tiny Phi-3: the Hugging Face layout of the real repo, deterministic, trained answers."""

from __future__ import annotations

import json

import pytest

from offline_kit.tiny_model import (
    PHI3_ADDED_TOKENS,
    TRAINED_ANSWERS,
    build_tiny_phi3,
    chat_prompt,
    greedy_answers,
    tree_digest,
)

PHI3_LAYOUT = {
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "README.md",
    "LICENSE",
}


@pytest.mark.integration
def test_layout_config_and_tokenizer_are_phi3s(tiny_model_dir):
    from transformers import AutoTokenizer

    assert {p.name for p in tiny_model_dir.iterdir()} == PHI3_LAYOUT
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["model_type"] == "phi3"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token in PHI3_ADDED_TOKENS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(token)) == token
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Spain?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == chat_prompt("What is the capital of Spain?")
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted(
        tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"])
    )


@pytest.mark.integration
def test_greedy_generation_gives_every_trained_answer(tiny_model_dir):
    answers = greedy_answers(tiny_model_dir, list(TRAINED_ANSWERS))
    assert {q: a.strip() for q, a in answers.items()} == TRAINED_ANSWERS


@pytest.mark.integration
def test_two_builds_are_byte_identical_and_a_build_reports_its_progress(tiny_model_dir, tmp_path):
    progress: list[str] = []
    rebuilt = build_tiny_phi3(tmp_path / "again", progress.append)
    assert tree_digest(rebuilt) == tree_digest(tiny_model_dir)
    # A first run is never silent: every 60 of the 600 training steps says so.
    steps = [line for line in progress if "Training the embedded tiny Phi-3: step" in line]
    assert len(steps) == 10 and steps[-1].startswith(
        "Training the embedded tiny Phi-3: step 600/600"
    ), progress
