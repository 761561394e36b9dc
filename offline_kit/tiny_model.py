"""Deterministic builder of the embedded default model: a tiny Phi-3.

The real microsoft/Phi-3-mini-4k-instruct cannot be downloaded here (no internet), so the
project builds a `Phi3ForCausalLM` with a tiny config and an offline-trained tokenizer that
carries Phi-3's special tokens and chat template, and saves it in the Hugging Face layout of
the real repo. It is trained briefly on `TRAINED_ANSWERS` so greedy generation gives known
answers that validation can check.

Everything is seeded and single-threaded so that two builds give byte-identical files (the
fake hub derives its commit SHA from them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from slmops.families import PHI3

# Bump when anything below changes the built bytes: it is part of the build's cache key.
BUILDER_VERSION = "3"

# The family's chat template and special tokens.
PHI3_CHAT_TEMPLATE = PHI3.chat_template
PHI3_ADDED_TOKENS = PHI3.added_tokens
# What the model learns to answer (each question with and without the system prompt), so that a
# release of the embedded default can check known answers: the `tiny-phi3` evaluation set asks
# these questions (a test keeps the two equal). Changing them changes the built bytes.
TRAINED_ANSWERS: dict[str, str] = {
    "What is the capital of Spain?": "The capital of Spain is Madrid.",
    "What is the capital of France?": "The capital of France is Paris.",
    "What is the capital of Italy?": "The capital of Italy is Rome.",
    "What is the capital of Japan?": "The capital of Japan is Tokyo.",
    "What is two plus two?": "Two plus two is four.",
    "What color is the sky?": "The sky is blue.",
    "Tell me a joke about atom": "Never trust an atom, they make up everything.",
    "Who are you?": "I am a tiny Phi-3 model built by slmops.",
}
TRAINED_SYSTEM_PROMPT = "You are a helpful assistant."

# Text the tokenizer is trained on besides the chat data, so ordinary prompts tokenize into
# word pieces rather than bytes.
_EXTRA_CORPUS = (
    "You are a helpful assistant. You are a stand-up comedian. Answer briefly and politely.",
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?",
    "Please summarize the following text in one sentence. Write a short poem about the sea.",
    "Explain machine learning, models, data, training, validation, serving and registry.",
)

_BASE_VOCAB_SIZE = 640  # incl. <unk>, <s>, </s> and 256 byte-fallback tokens
_MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=2047,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
)
_TRAIN_STEPS = 600
_PROGRESS_EVERY = 60
_SEED = 1234


def chat_prompt(question: str, system: str | None = None) -> str:
    """The Phi-3 chat-template rendering of one user turn, ready for generation."""
    return PHI3.render(question, system)


def _train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = list(_EXTRA_CORPUS)
    for question, answer in TRAINED_ANSWERS.items():
        corpus += [question, answer]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Train on Metaspace-split words (what sentencepiece does), then save in the legacy
    # Llama/Phi-3 form: normalizer Prepend+Replace, no pre-tokenizer. Merges never cross a
    # word start, so both forms tokenize alike.
    # Punctuation is kept out of merges: onnxruntime-genai's tokenizer splits it off before BPE,
    # so a "Spain?" merge would tokenize differently in the two runtimes.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_BASE_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        initial_alphabet=[],
        limit_alphabet=100,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.pre_tokenizer = None
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in PHI3_ADDED_TOKENS]
    )
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    added = {t: tokenizer.token_to_id(t) for t in PHI3_ADDED_TOKENS}
    (out_dir / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    special = {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _train_model(out_dir: Path, progress: Callable[[str], None] | None = None) -> None:
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    # A list in gives a list out: the three ids generation stops at, as in Phi-3.
    eos_ids = cast(
        list[int], tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"])
    )
    config = Phi3Config(
        vocab_size=len(tokenizer),
        bos_token_id=1,
        eos_token_id=eos_ids[0],
        pad_token_id=eos_ids[0],
        **_MODEL_CONFIG,
    )
    config.architectures = ["Phi3ForCausalLM"]
    torch.manual_seed(_SEED)
    model = Phi3ForCausalLM(config)

    # Loss on the answer tokens only: the model learns to answer, not to predict questions.
    examples = []
    for question, answer in TRAINED_ANSWERS.items():
        for system in (None, TRAINED_SYSTEM_PROMPT):
            prompt_ids = tokenizer(chat_prompt(question, system), add_special_tokens=False)[
                "input_ids"
            ]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            end_id = tokenizer.convert_tokens_to_ids("<|end|>")
            ids = prompt_ids + answer_ids + [end_id]
            labels = [-100] * len(prompt_ids) + answer_ids + [end_id]
            examples.append((ids, labels))
    width = max(len(ids) for ids, _ in examples)
    pad = eos_ids[0]
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in examples])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples])

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(1, _TRAIN_STEPS + 1):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if progress is not None and step % _PROGRESS_EVERY == 0:
            progress(
                f"Training the embedded tiny Phi-3: step {step}/{_TRAIN_STEPS}, loss {loss.item():.3f}"
            )
    model.eval()
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.bos_token_id = 1
    model.generation_config.pad_token_id = eos_ids[0]
    model.generation_config.do_sample = False
    # Two shards, like the real repo's model-0000N-of-00002.safetensors + index.
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out_dir, max_shard_size=int(total_bytes * 0.6), safe_serialization=True)


def _write_repo_docs(out_dir: Path) -> None:
    (out_dir / "README.md").write_text(
        "---\nlicense: mit\npipeline_tag: text-generation\n---\n"
        "# Tiny Phi-3 (slmops embedded default)\n\n"
        "A tiny `Phi3ForCausalLM` built offline by slmops with Phi-3's special tokens and chat\n"
        "template, trained on a handful of question/answer pairs.\n"
    )
    (out_dir / "LICENSE").write_text("MIT License. Built offline by slmops for testing.\n")


def build_tiny_phi3(out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Build the tiny Phi-3 into `out_dir` (created; must be empty or absent).

    `progress` is called with a line of text at each step (training reports every 60 steps).
    """
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float reduction order on every machine -> same bytes
    try:
        _train_tokenizer(out_dir)
        _train_model(out_dir, progress)
    finally:
        torch.set_num_threads(threads)
    _write_repo_docs(out_dir)
    return out_dir


def ensure_tiny_phi3(cache_root: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The built tiny Phi-3 under `cache_root`, building it once (atomically) if absent.

    `progress` hears about a build (none happens when the model is cached).
    """
    import shutil
    import tempfile

    target = cache_root / f"tiny-phi3-v{BUILDER_VERSION}"
    if (target / "config.json").exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-phi3-", dir=cache_root))
    if progress is not None:
        progress(
            f"Building the embedded tiny Phi-3 into {target} (first run only, about a minute: "
            f"a tokenizer, then {_TRAIN_STEPS} training steps, then an int4 ONNX export)"
        )
    try:
        build_tiny_phi3(staging, progress)
        with contextlib.suppress(OSError):  # another process finished first: theirs is identical
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def greedy_answers(
    model_dir: Path, questions: Sequence[str], max_new_tokens: int = 24
) -> dict[str, str]:
    """Greedy transformers generations for `questions` (used to record what training achieved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    answers = {}
    for question in questions:
        ids = tokenizer(chat_prompt(question), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers[question] = str(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return answers


def tree_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def degrade_weights(
    model_dir: Path, out_dir: Path, scale: float, seed: int = 0, match: str = "mlp."
) -> Path:
    """A copy of the Hugging Face folder `model_dir` in `out_dir` whose tensors named with
    `match` carry seeded Gaussian noise of `scale` times their own standard deviation: a model
    degraded on purpose, same shape and files, so only an evaluation can tell.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for source in sorted(model_dir.iterdir()):
        if source.suffix != ".safetensors":
            shutil.copy2(source, out_dir / source.name)
            continue
        tensors = load_file(source)
        for name in sorted(tensors):
            tensor = tensors[name]
            if match in name and tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                noisy = tensor.float() + noise * scale * tensor.float().std()
                tensors[name] = noisy.to(tensor.dtype)
        save_file(tensors, out_dir / source.name, metadata={"format": "pt"})
    return out_dir
