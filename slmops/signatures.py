"""The signature each wrapper kind must have, and a readable diff between two signatures.

The chat signature is taken from MLflow's own llm/v1/chat definition (what
`mlflow.transformers.log_model(task="llm/v1/chat")` sets), so the ONNX chat wrapper matches the
transformers one on whatever MLflow version is installed. `CHAT_SIGNATURE_V1` is the shape the
source document describes (older MLflow): the fallback when MLflow no longer exposes its own.
"""

from __future__ import annotations

from typing import Any

from mlflow.models.signature import ModelSignature
from mlflow.types.schema import (
    AnyType,
    Array,
    ColSpec,
    DataType,
    Map,
    Object,
    ParamSchema,
    Property,
    Schema,
    TensorSpec,
)

from slmops.config import WrapperKind
from slmops.families import PHI3

PROMPT_INPUT_EXAMPLE: dict[str, str] = {
    "prompt": PHI3.render("Tell me a joke about atom", system="You are a stand-up comedian.")
}
CHAT_INPUT_EXAMPLE: dict[str, Any] = {
    "messages": [{"role": "user", "content": "What is the capital of Spain?"}]
}

PROMPT_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "prompt")]),
    outputs=Schema([ColSpec(DataType.string)]),
)

_MESSAGE = Object(
    [
        Property("content", DataType.string),
        Property("name", DataType.string, required=False),
        Property("role", DataType.string),
    ]
)
CHAT_SIGNATURE_V1 = ModelSignature(
    inputs=Schema(
        [
            ColSpec(Array(_MESSAGE), "messages"),
            ColSpec(DataType.double, "temperature", required=False),
            ColSpec(DataType.long, "max_tokens", required=False),
            ColSpec(Array(DataType.string), "stop", required=False),
            ColSpec(DataType.long, "n", required=False),
            ColSpec(DataType.boolean, "stream", required=False),
        ]
    ),
    outputs=Schema(
        [
            ColSpec(DataType.string, "id"),
            ColSpec(DataType.string, "object"),
            ColSpec(DataType.long, "created"),
            ColSpec(DataType.string, "model"),
            ColSpec(
                Array(
                    Object(
                        [
                            Property("finish_reason", DataType.string),
                            Property("index", DataType.long),
                            Property("message", _MESSAGE),
                        ]
                    )
                ),
                "choices",
            ),
            ColSpec(
                Object(
                    [
                        Property("completion_tokens", DataType.long),
                        Property("prompt_tokens", DataType.long),
                        Property("total_tokens", DataType.long),
                    ]
                ),
                "usage",
            ),
        ]
    ),
)


def chat_signature() -> ModelSignature:
    """The llm/v1/chat signature as the installed MLflow defines it."""
    try:
        from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA
    except ImportError:  # an MLflow without its own definition: the documented one
        return CHAT_SIGNATURE_V1
    return ModelSignature(inputs=CHAT_MODEL_INPUT_SCHEMA, outputs=CHAT_MODEL_OUTPUT_SCHEMA)


def expected_signature(kind: WrapperKind) -> ModelSignature:
    """The signature a model of `kind` must be logged with."""
    if kind is WrapperKind.PROMPT_ONNX:
        return PROMPT_SIGNATURE
    return chat_signature()


def input_example(kind: WrapperKind) -> dict[str, Any]:
    """The input example logged with a model of `kind`."""
    return PROMPT_INPUT_EXAMPLE if kind is WrapperKind.PROMPT_ONNX else CHAT_INPUT_EXAMPLE


def signature_diff(expected: ModelSignature | None, actual: ModelSignature | None) -> list[str]:
    """One readable line per difference between two signatures; empty when they are equal."""
    if expected is None or actual is None:
        if expected is actual:
            return []
        return ["signature: expected none" if expected is None else "signature: missing"]
    lines = _schema_diff("inputs", expected.inputs, actual.inputs)
    lines += _schema_diff("outputs", expected.outputs, actual.outputs)
    lines += _params_diff(expected.params, actual.params)
    return lines


def _describe(dtype: Any) -> str:
    return dtype.name if isinstance(dtype, DataType) else repr(dtype)


def _required(flag: bool) -> str:
    return "required" if flag else "optional"


def _column_key(spec: ColSpec | TensorSpec, position: int) -> str:
    return spec.name if spec.name is not None else f"#{position}"


def _schema_diff(side: str, expected: Schema | None, actual: Schema | None) -> list[str]:
    if expected is None or actual is None:
        if expected is actual:
            return []
        return [f"{side}: expected no schema" if expected is None else f"{side}: schema missing"]
    want = {_column_key(c, i): c for i, c in enumerate(expected.inputs)}
    have = {_column_key(c, i): c for i, c in enumerate(actual.inputs)}
    lines = [
        f"{side}: missing column {key!r} ({_spec_text(spec)})"
        for key, spec in want.items()
        if key not in have
    ]
    lines += [
        f"{side}: extra column {key!r} ({_spec_text(spec)})"
        for key, spec in have.items()
        if key not in want
    ]
    for key, spec in want.items():
        if key in have:
            lines += _spec_diff(f"{side}.{key}", spec, have[key])
    if not lines and expected != actual:
        lines.append(f"{side}: same columns in another order: {list(have)}, expected {list(want)}")
    return lines


def _spec_text(spec: ColSpec | TensorSpec) -> str:
    if isinstance(spec, TensorSpec):
        return f"tensor {spec.type} {spec.shape}"
    return f"{_describe(spec.type)}, {_required(spec.required)}"


def _spec_diff(
    path: str, expected: ColSpec | TensorSpec, actual: ColSpec | TensorSpec
) -> list[str]:
    if isinstance(expected, TensorSpec) or isinstance(actual, TensorSpec):
        return (
            []
            if expected == actual
            else [f"{path}: {_spec_text(actual)} != expected {_spec_text(expected)}"]
        )
    lines = []
    if expected.required != actual.required:
        lines.append(
            f"{path}: {_required(actual.required)}, expected {_required(expected.required)}"
        )
    return lines + _type_diff(path, expected.type, actual.type)


def _type_diff(path: str, expected: Any, actual: Any) -> list[str]:
    if expected == actual:
        return []
    if isinstance(expected, Array) and isinstance(actual, Array):
        return _type_diff(f"{path}[]", expected.dtype, actual.dtype)
    if isinstance(expected, Map) and isinstance(actual, Map):
        return _type_diff(f"{path}{{}}", expected.value_type, actual.value_type)
    if isinstance(expected, Object) and isinstance(actual, Object):
        want = {p.name: p for p in expected.properties}
        have = {p.name: p for p in actual.properties}
        lines = []
        for name in sorted(want.keys() - have.keys()):
            prop = want[name]
            lines.append(
                f"{path}.{name}: missing property ({_describe(prop.dtype)}, "
                f"{_required(prop.required)})"
            )
        for name in sorted(have.keys() - want.keys()):
            prop = have[name]
            lines.append(
                f"{path}.{name}: extra property ({_describe(prop.dtype)}, "
                f"{_required(prop.required)})"
            )
        for name in sorted(want.keys() & have.keys()):
            if want[name].required != have[name].required:
                lines.append(
                    f"{path}.{name}: {_required(have[name].required)}, "
                    f"expected {_required(want[name].required)}"
                )
            lines += _type_diff(f"{path}.{name}", want[name].dtype, have[name].dtype)
        return lines
    if isinstance(expected, AnyType) and isinstance(actual, AnyType):
        return []
    return [f"{path}: type {_describe(actual)}, expected {_describe(expected)}"]


def _params_diff(expected: ParamSchema | None, actual: ParamSchema | None) -> list[str]:
    want = {p.name: p for p in (expected.params if expected else [])}
    have = {p.name: p for p in (actual.params if actual else [])}
    lines = [f"params: missing {want[name]!r}" for name in sorted(want.keys() - have.keys())]
    lines += [f"params: extra {have[name]!r}" for name in sorted(have.keys() - want.keys())]
    lines += [
        f"params.{name}: {have[name]!r}, expected {want[name]!r}"
        for name in sorted(want.keys() & have.keys())
        if want[name] != have[name]
    ]
    return lines
