"""A mid-size Phi-3-shaped model, built offline, for the benchmarks where size matters.

The embedded tiny Phi-3 (~2 MB) is all overhead: per-token compute is too small to show what
int4 buys or what a copy costs. This model has Phi-3-mini's layer shapes scaled down (hidden
1024, intermediate 2816, 12 layers, 16 heads, vocab 32064: ~220 M parameters, ~440 MB in bf16,
the dtype Phi-3 ships in). Weights are random: latency and memory do not depend on training.

It reuses the tiny model's tokenizer (592 ids). Rows of `lm_head` for ids the tokenizer does
not know, and for the end-of-sequence ids, are zeroed: with random weights the other logits are
positive for some id almost surely, so greedy decoding never stops early and never produces an
id that cannot be decoded. Every generation therefore runs to `max_new_tokens` in both runtimes,
which is what a fair tokens/s comparison needs.

Built once into `~/.cache/slmops-bench/` (or `$SLMOPS_BENCH_CACHE`), atomically, with its int4
onnxruntime-genai export made by the project's own `build_onnx_model`.

    python -m benchmarks.midsize          # build (or find) it and print the folders
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slmops.config import OnnxExportSpec

BENCH_VERSION = "1"
MIDSIZE_SHAPE = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32064,
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_SEED = 4321


@dataclass(frozen=True)
class MidsizeModel:
    """Where the mid-size model's folders are."""

    hf_dir: Path  # Hugging Face layout, bf16 safetensors
    onnx_int4_dir: Path  # onnxruntime-genai folder, int4 block 32 accuracy level 4

    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.hf_dir.glob("*.safetensors"))

    def onnx_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.onnx_int4_dir.iterdir() if p.is_file())


def bench_cache() -> Path:
    return Path(os.environ.get("SLMOPS_BENCH_CACHE", Path.home() / ".cache" / "slmops-bench"))


def tiny_model_dir(cache: Path) -> Path:
    """The embedded tiny Phi-3 (for its tokenizer), built once under `cache`."""
    from offline_kit.tiny_model import ensure_tiny_phi3

    return ensure_tiny_phi3(cache / "embedded")


def _build_hf(out_dir: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    tiny_config = json.loads((tokenizer_dir / "config.json").read_text())
    tiny_generation = json.loads((tokenizer_dir / "generation_config.json").read_text())
    known_ids = int(tiny_config["vocab_size"])
    eos_ids = [int(i) for i in tiny_generation["eos_token_id"]]
    config = Phi3Config(
        **MIDSIZE_SHAPE,
        bos_token_id=tiny_config["bos_token_id"],
        eos_token_id=tiny_config["eos_token_id"],
        pad_token_id=tiny_config["pad_token_id"],
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=2047,
        tie_word_embeddings=False,
    )
    config.architectures = ["Phi3ForCausalLM"]
    torch.manual_seed(_SEED)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[known_ids:] = 0.0
        model.lm_head.weight[eos_ids] = 0.0
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.do_sample = False
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out_dir / name)


def _atomic_build(target: Path, build) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        with contextlib.suppress(OSError):  # built concurrently: the other copy is as good
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_midsize(cache: Path | None = None) -> MidsizeModel:
    """The mid-size model and its int4 export, building what is missing (minutes, once)."""
    from slmops.onnx_builder import build_onnx_model

    cache = cache or bench_cache()
    root = cache / f"phi3-mid-v{BENCH_VERSION}"
    tokenizer_dir = tiny_model_dir(cache)
    hf_dir = _atomic_build(root / "hf", lambda out: _build_hf(out, tokenizer_dir))
    onnx_dir = root / "onnx-int4"
    if not (onnx_dir / "genai_config.json").exists():
        build_onnx_model(hf_dir, onnx_dir, OnnxExportSpec())
    return MidsizeModel(hf_dir=hf_dir, onnx_int4_dir=onnx_dir)


if __name__ == "__main__":
    model = ensure_midsize()
    print(f"hf:   {model.hf_dir} ({model.weights_bytes() / 1e6:.0f} MB of weights)")
    print(f"onnx: {model.onnx_int4_dir} ({model.onnx_bytes() / 1e6:.0f} MB)")
