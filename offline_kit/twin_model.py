"""A random-weight twin of Phi-3-mini-4k-instruct, for rehearsing a full-size release offline.

The real weights cannot be downloaded here, but what a release costs (memory, time, disk)
depends on the shapes and the dtype, not on the values. The twin has Phi-3-mini-4k-instruct's
exact `config.json` (hidden 3072, 32 layers, 32 heads, intermediate 8192, vocab 32064, 4096
context, bf16), two safetensors shards with `model.safetensors.index.json`, deterministic random
weights and the embedded tokenizer (whose ids are all < 32064). `num_layers` makes a CI-sized
variant (full width, 1-2 layers) that runs the same code path in seconds.

Random weights generate noise, so two things keep generation deterministic and bounded, as in
`benchmarks/midsize.py`: the `lm_head` rows of ids the tokenizer does not know, of the
end-of-sequence ids and of ids that decode to nothing visible (byte pieces, whitespace) are zero
(every greedy step picks a printable word piece and never stops early, so each generation runs
to `max_new_tokens` and is never blank, whatever the seed), and the weights come from a seeded
generator per tensor. A different `seed` is a different commit of the same model (a new release).

The checkpoint is written tensor by tensor, each in row chunks, straight into the shard files:
building it never holds more than one chunk in memory (the whole twin is 7.6 GB).

The special-token ids in `config.json` are the embedded tokenizer's (bos 1, eos/pad 581), not
the real model's 32000: config and tokenizer must agree, and the tokenizer is the embedded one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from slmops.config import PHI3_ONNX_INT4_SUBFOLDER, OnnxExportSpec

TWIN_BUILDER_VERSION = "2"
TWIN_REPO_ID = "slmops/phi3-mini-twin"
TWIN_ONNX_REPO_ID = "slmops/phi3-mini-twin-onnx"
PHI3_MINI_LAYERS = 32
DEFAULT_SEED = 20260611

# microsoft/Phi-3-mini-4k-instruct's config.json, less `auto_map` (transformers has Phi-3
# natively; the remote code is not fetched) and with the embedded tokenizer's special ids.
PHI3_MINI_CONFIG: dict = {
    "architectures": ["Phi3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "embd_pdrop": 0.0,
    "eos_token_id": 581,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 32,
    "num_hidden_layers": PHI3_MINI_LAYERS,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 581,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.2",
    "use_cache": True,
    "vocab_size": 32064,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
SHARD_COUNT = 2
_CHUNK_ELEMENTS = 1 << 24  # 16 M values: 64 MB of float32 scratch per chunk
_INIT_STD = 0.02  # Phi-3's initializer_range, what `Phi3ForCausalLM(config)` would draw


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the checkpoint: its name, shape and how its values are made."""

    name: str
    shape: tuple[int, ...]
    fill: str  # "random", "ones", or "lm_head" (random rows for known ids, zero elsewhere)

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return 2 * self.numel  # bf16


@dataclass(frozen=True)
class TwinRepos:
    """The twin's two hub repos as local folders."""

    model_dir: Path  # Hugging Face layout: served as TWIN_REPO_ID
    onnx_repo_dir: Path | None  # the int4 ONNX release: served as TWIN_ONNX_REPO_ID

    def as_hub_repos(
        self, repo_id: str = TWIN_REPO_ID, onnx_repo_id: str = TWIN_ONNX_REPO_ID
    ) -> dict[str, Path]:
        repos = {repo_id: self.model_dir}
        if self.onnx_repo_dir is not None:
            repos[onnx_repo_id] = self.onnx_repo_dir
        return repos


def twin_config(num_layers: int = PHI3_MINI_LAYERS) -> dict:
    """Phi-3-mini-4k-instruct's config with `num_layers` decoder layers."""
    if not 1 <= num_layers <= PHI3_MINI_LAYERS:
        raise ValueError(f"num_layers must be between 1 and {PHI3_MINI_LAYERS}, got {num_layers}")
    return {**PHI3_MINI_CONFIG, "num_hidden_layers": num_layers}


def tensor_plan(config: dict) -> list[TensorPlan]:
    """Phi-3's tensors in checkpoint order (fused qkv_proj and gate_up_proj, as HF stores them)."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv_rows = hidden + 2 * config["num_key_value_heads"] * head_dim
    plan = [TensorPlan("model.embed_tokens.weight", (vocab, hidden), "random")]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        plan += [
            TensorPlan(f"{prefix}.input_layernorm.weight", (hidden,), "ones"),
            TensorPlan(f"{prefix}.self_attn.qkv_proj.weight", (qkv_rows, hidden), "random"),
            TensorPlan(f"{prefix}.self_attn.o_proj.weight", (hidden, hidden), "random"),
            TensorPlan(f"{prefix}.post_attention_layernorm.weight", (hidden,), "ones"),
            TensorPlan(f"{prefix}.mlp.gate_up_proj.weight", (2 * inter, hidden), "random"),
            TensorPlan(f"{prefix}.mlp.down_proj.weight", (hidden, inter), "random"),
        ]
    plan += [
        TensorPlan("model.norm.weight", (hidden,), "ones"),
        TensorPlan("lm_head.weight", (vocab, hidden), "lm_head"),
    ]
    return plan


def _tensor_seed(seed: int, name: str) -> int:
    # Per tensor, so a tensor's values do not depend on the order or count of the others.
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _bf16_chunks(
    plan: TensorPlan, seed: int, known_ids: int, zero_ids: frozenset[int]
) -> Iterator[bytes]:
    """The tensor's bf16 bytes in row chunks of at most `_CHUNK_ELEMENTS` values."""
    import torch

    rows = plan.shape[0] if len(plan.shape) == 2 else 1
    row_len = plan.numel // rows
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // row_len)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, plan.name))
    for start in range(0, rows, rows_per_chunk):
        count = min(rows_per_chunk, rows - start)
        if plan.fill == "ones":
            chunk = torch.ones(count, row_len, dtype=torch.bfloat16)
        elif plan.fill == "lm_head" and start >= known_ids:
            chunk = torch.zeros(count, row_len, dtype=torch.bfloat16)
        else:
            values = torch.randn(count, row_len, generator=generator) * _INIT_STD
            chunk = values.to(torch.bfloat16)
            if plan.fill == "lm_head":
                chunk[max(0, known_ids - start) :] = 0
                for row in zero_ids:
                    if start <= row < start + count:
                        chunk[row - start] = 0
        yield chunk.view(torch.int16).numpy().tobytes()


def _safetensors_header(plans: list[TensorPlan]) -> bytes:
    offset, entries = 0, {}
    for plan in plans:
        entries[plan.name] = {
            "dtype": "BF16",
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":"))
    padded = header.encode() + b" " * (-len(header) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(padded)) + padded


def _write_shard(
    out: BinaryIO, plans: list[TensorPlan], seed: int, known_ids: int, zero_ids: frozenset[int]
) -> None:
    out.write(_safetensors_header(plans))
    for plan in plans:
        for chunk in _bf16_chunks(plan, seed, known_ids, zero_ids):
            out.write(chunk)


def split_shards(plans: list[TensorPlan], count: int = SHARD_COUNT) -> list[list[TensorPlan]]:
    """`plans` in order, cut into `count` shards of about equal bytes (as HF's save does)."""
    total = sum(p.nbytes for p in plans)
    shards: list[list[TensorPlan]] = [[] for _ in range(count)]
    written = 0
    for plan in plans:
        index = min(count - 1, written * count // total)
        shards[index].append(plan)
        written += plan.nbytes
    return [shard for shard in shards if shard]


def _invisible_ids(tokenizer_dir: Path) -> frozenset[int]:
    """Ids that decode to blank text on their own (byte pieces, whitespace, special tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return frozenset(
        i
        for i in range(len(tokenizer))
        if not str(tokenizer.decode([i], skip_special_tokens=True)).strip()
    )


def write_twin_checkpoint(
    out_dir: Path, tokenizer_dir: Path, num_layers: int = PHI3_MINI_LAYERS, seed: int = DEFAULT_SEED
) -> Path:
    """Write the twin (config, shards, index, generation config, tokenizer) into `out_dir`.

    Args:
        out_dir: an empty or absent folder.
        tokenizer_dir: the embedded tiny Phi-3 (for its tokenizer files and special ids).
        num_layers: decoder layers (32 = full size; 1-2 for CI).
        seed: weight seed; a different seed is a different model commit.
    """
    tiny_config = json.loads((tokenizer_dir / "config.json").read_text())
    tiny_generation = json.loads((tokenizer_dir / "generation_config.json").read_text())
    known_ids = int(tiny_config["vocab_size"])
    eos_ids = [int(i) for i in tiny_generation["eos_token_id"]]
    never_generated = frozenset(eos_ids) | _invisible_ids(tokenizer_dir)
    config = twin_config(num_layers)
    if known_ids > config["vocab_size"]:
        raise ValueError(f"tokenizer has {known_ids} ids, more than the vocab of 32064")
    config.update(
        bos_token_id=tiny_config["bos_token_id"],
        eos_token_id=tiny_config["eos_token_id"],
        pad_token_id=tiny_config["pad_token_id"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = tensor_plan(config)
    shards = split_shards(plans)
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with (out_dir / name).open("wb") as out:
            _write_shard(out, shard, seed, known_ids, never_generated)
        weight_map.update({plan.name: name for plan in shard})
    index = {
        "metadata": {
            "total_parameters": sum(p.numel for p in plans),
            "total_size": sum(p.nbytes for p in plans),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "do_sample": False,
        "eos_token_id": eos_ids,
        "pad_token_id": config["pad_token_id"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out_dir / name)
    (out_dir / "README.md").write_text(
        "# Phi-3-mini-4k-instruct twin (slmops rehearsal)\n\n"
        f"Random weights (seed {seed}), {num_layers} layer(s), Phi-3-mini's shapes and dtype.\n"
    )
    return out_dir


def _atomic(target: Path, build) -> Path:
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        (staging / ".complete").touch()  # hidden: the fake hub does not serve it
        shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(OSError):  # built concurrently: the other copy is as good
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_twin_repos(
    cache_root: Path,
    tokenizer_dir: Path,
    *,
    num_layers: int = PHI3_MINI_LAYERS,
    seed: int = DEFAULT_SEED,
    with_onnx: bool = True,
    onnx_spec: OnnxExportSpec | None = None,
) -> TwinRepos:
    """The twin and (optionally) its int4 ONNX release under `cache_root`, built once each.

    The ONNX release is laid out as microsoft/Phi-3-mini-4k-instruct-onnx is (the int4 CPU build
    in `cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/`), and made with the project's own
    `build_onnx_model`, memory guard included.
    """
    from slmops.onnx_builder import build_onnx_model

    name = f"phi3-twin-v{TWIN_BUILDER_VERSION}-l{num_layers}-s{seed}"
    model_dir = _atomic(
        cache_root / name,
        lambda out: write_twin_checkpoint(out, tokenizer_dir, num_layers, seed),
    )
    onnx_repo = None
    if with_onnx:

        def build_release(out: Path) -> None:
            build_onnx_model(
                model_dir, out / PHI3_ONNX_INT4_SUBFOLDER, onnx_spec or OnnxExportSpec()
            )
            (out / "README.md").write_text(
                f"# {name} ONNX (slmops rehearsal)\n\nint4 CPU build in `{PHI3_ONNX_INT4_SUBFOLDER}/`.\n"
            )

        onnx_repo = _atomic(cache_root / f"{name}-onnx", build_release)
    return TwinRepos(model_dir=model_dir, onnx_repo_dir=onnx_repo)
