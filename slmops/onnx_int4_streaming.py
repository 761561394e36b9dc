"""Quantize an fp32 onnxruntime-genai model to int4 one weight at a time (bounded memory).

onnxruntime-genai's builder quantizes int4 by handing the whole fp32 graph to ONNX Runtime's
`MatMulNBitsQuantizer` as one protobuf: 2x the bf16 checkpoint in fp32, ~19 GB of anonymous
memory for Phi-3-mini (see `slmops.onnx_builder`). Its fp32 export, by contrast, writes each
weight to disk as it is materialised. So the int4 build is done in two steps:

1. the builder's fp32 export (`-p fp32`), streamed to disk;
2. this module: the fp32 model's protobuf is loaded without its external data; each MatMul
   weight is read from the data file through a memory map, quantized on its own by the same
   `MatMulNBitsQuantizer` (in a one-node model, with the options the builder passes it: 4 bits,
   symmetric, QOperator MatMulNBits, the default RTN algorithm, the block size and accuracy
   level asked for), and written to the new data file at once; every other tensor is copied.

Peak memory is about one weight in fp32 plus its copy (Phi-3's lm_head: ~0.4 GB each). The
nodes and tensors come out as the builder names them, so `genai_config.json` and the rest of
the fp32 folder are reused unchanged.

    python -m slmops.onnx_int4_streaming FP32_DIR OUT_DIR --block-size 32 --accuracy-level 4
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"
DATA_SUFFIX = ".data"
_ALIGN = 4096  # page-aligned tensors, as onnx_ir writes large ones
_COPY_CHUNK = 64 << 20


def _external_info(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _read_fp32(data_path: Path, tensor: Any) -> Any:
    import numpy as np

    info = _external_info(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    return np.memmap(data_path, dtype=np.float32, mode="r", offset=int(info["offset"]), shape=shape)


def _quantize_matmul(
    node: Any, weight_name: str, weight: Any, block_size: int, accuracy_level: int
) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) that replace `node` (a MatMul by `weight`), from ORT's quantizer."""
    import numpy as np
    from onnx import NodeProto, TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", [node.input[0], weight_name], list(node.output), node.name)],
        "one_matmul",
        [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(weight), weight_name)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    quantizer = MatMulNBitsQuantizer(
        model=model,
        bits=4,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
        algo_config=None,
    )
    quantizer.process()
    out = quantizer.model.model.graph
    # Fresh copies: a reference to a sub-message keeps the quantizer's whole model (its arena,
    # the fp32 weight included) alive, which grew memory by every weight quantized.
    nodes = [_copy(NodeProto, n) for n in out.node]
    tensors = [_copy(TensorProto, t) for t in out.initializer]
    return nodes, tensors


def _copy(kind: Any, message: Any) -> Any:
    fresh = kind()
    fresh.CopyFrom(message)
    return fresh


class _DataWriter:
    """Appends tensors to the new external data file, page-aligned."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("wb")
        self._offset = 0

    def _pad(self) -> None:
        padding = -self._offset % _ALIGN
        if padding:
            self._file.write(b"\0" * padding)
            self._offset += padding

    def _point(self, tensor: Any, offset: int, length: int) -> None:
        from onnx import TensorProto

        del tensor.external_data[:]
        for key, value in (
            ("location", self.path.name),
            ("offset", str(offset)),
            ("length", str(length)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL

    def write_tensor(self, tensor: Any) -> Any:
        """Write an in-memory tensor's raw bytes to the file; returns the tensor pointing there.

        A new message, not `tensor` with its field cleared: clearing does not give memory back.
        """
        from onnx import TensorProto

        self._pad()
        raw = tensor.raw_data
        self._file.write(raw)
        external = TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
        self._point(external, self._offset, len(raw))
        self._offset += len(raw)
        return external

    def copy_tensor(self, tensor: Any, source: Path) -> None:
        """Copy an external tensor's bytes from `source` in chunks."""
        info = _external_info(tensor)
        start, length = int(info.get("offset", 0)), int(info["length"])
        self._pad()
        offset = self._offset
        with source.open("rb") as src:
            src.seek(start)
            remaining = length
            while remaining:
                chunk = src.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    raise ValueError(f"{source} ends inside tensor {tensor.name}")
                self._file.write(chunk)
                remaining -= len(chunk)
        self._point(tensor, offset, length)
        self._offset += length

    def close(self) -> None:
        self._file.close()


def _matmul_weights(graph: Any) -> Iterator[tuple[int, Any, Any]]:
    """(index, node, weight initializer) of each MatMul whose B is a 2-D fp32 initializer."""
    from onnx import TensorProto

    initializers = {t.name: t for t in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = initializers.get(node.input[1])
        if weight is not None and weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2:
            yield index, node, weight


def quantize_int4_streaming(
    fp32_dir: Path, out_dir: Path, *, block_size: int = 32, accuracy_level: int = 4
) -> Path:
    """Write the int4 version of the fp32 onnxruntime-genai folder `fp32_dir` into `out_dir`."""
    import onnx
    from onnx import helper

    source_model = fp32_dir / MODEL_FILE
    model = onnx.load(str(source_model), load_external_data=False)
    graph = model.graph
    data_names = {_external_info(t)["location"] for t in graph.initializer if t.external_data}
    if len(data_names) != 1:
        raise ValueError(f"{source_model}: expected one external data file, found {data_names}")
    source_data = fp32_dir / data_names.pop()
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _DataWriter(out_dir / (MODEL_FILE + DATA_SUFFIX))
    try:
        replaced: dict[int, list[Any]] = {}
        quantized_names: set[str] = set()
        new_initializers = []
        for index, node, weight in list(_matmul_weights(graph)):
            nodes, tensors = _quantize_matmul(
                node,
                weight.name,
                _read_fp32(source_data, weight),
                block_size,
                accuracy_level,
            )
            # To disk now, so memory stays at about one weight.
            new_initializers += [writer.write_tensor(tensor) for tensor in tensors]
            replaced[index] = nodes
            quantized_names.add(weight.name)
        kept = []
        for tensor in graph.initializer:
            if tensor.name in quantized_names:
                continue
            if tensor.external_data:
                writer.copy_tensor(tensor, source_data)
            kept.append(tensor)
        nodes_out = []
        for index, node in enumerate(graph.node):
            nodes_out.extend(replaced.get(index, [node]))
        del graph.node[:]
        graph.node.extend(nodes_out)
        del graph.initializer[:]
        graph.initializer.extend(kept + new_initializers)
    finally:
        writer.close()
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_dir / MODEL_FILE))
    for item in fp32_dir.iterdir():  # genai_config.json, tokenizer, chat template
        if item.name not in (MODEL_FILE, source_data.name) and item.is_file():
            shutil.copy2(item, out_dir / item.name)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--accuracy-level", type=int, default=4)
    args = parser.parse_args(argv)
    quantize_int4_streaming(
        args.fp32_dir,
        args.out_dir,
        block_size=args.block_size,
        accuracy_level=args.accuracy_level,
    )


if __name__ == "__main__":
    main()
