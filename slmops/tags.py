"""The MLflow tag names slmops writes and reads, and the tags of a registered version.

One place for every name: a typo in a tag read by the promotion guard would silently let an
unvalidated version through.
"""

from __future__ import annotations

# On runs (and their LoggedModels).
CANDIDATE = "slmops.candidate"  # pending -> true | false: whether a run's model may be registered
KIND = "slmops.kind"  # the WrapperKind value
FAILURE = "slmops.failure"  # why a run is not a candidate
FLOW_RUN = "slmops.prefect.flow_run_id"  # the Prefect flow run that opened the run
VALIDATION = "slmops.validation"  # passed | failed (and `.summary`)
VALIDATION_SUMMARY = "slmops.validation.summary"
PARITY = "slmops.parity"  # passed | failed
PARITY_COMPARED = "slmops.parity.compared"  # e.g. "onnx int4 vs auto": what parity compared
EVALUATION_SET = "slmops.evaluation.set"  # <set name>@<digest>: what the model was evaluated on
SOURCE_PREFIX = "slmops.source."  # + repo, commit: where the weights came from
# Param of an ONNX wrapper's run (and so of its LoggedModel): the stored ONNX folder it names.
ONNX_ARTIFACT_URI_PARAM = "onnx.artifact_uri"

# On registered model versions.
SOURCE_REPO_ID = "slmops.source.repo_id"  # also on the registered model: its one source repo
SOURCE_COMMIT = "slmops.source.commit"
SOURCE_MODEL_URI = "slmops.source_model_uri"  # the logged model a version was registered from
ONNX_OPTIONS = "slmops.onnx"
VALIDATION_PASSED = "slmops.validation.passed"  # true | false: the promotion guard reads it
AUDIT_PREFIX = "slmops.audit."  # + timestamp: one registry move each
# JSON {at, by, reason, deleted}: the version's stored files were deleted by retention (the
# prune flow); it can no longer be served, rolled back to or promoted. Also on a pruned
# `store-onnx` run.
PRUNED = "slmops.pruned"
EVALUATION_PREFIX = "slmops.evaluation."  # + set name: the version's Evaluation as JSON

# On runs and registered versions: the promotion gate's decision.
GATE = "slmops.gate"  # passed | failed | forced; `slmops.gate.<metric>`: one rule each
GATE_SUMMARY = "slmops.gate.summary"
GATE_OVERRIDE = "slmops.gate.override_reason"  # why `promote: force` promoted past the gate

# MLflow caps tag values at 5000 characters (8000 on newer stores): summaries are cut to fit.
MAX_VALUE_CHARS = 4000


def evaluation_tag(eval_set: str) -> str:
    """The version tag holding its evaluation on `eval_set`."""
    return f"{EVALUATION_PREFIX}{eval_set}"


def version_tags(
    repo_id: str, commit: str, onnx_options: str, passed: bool, summary: str
) -> dict[str, str]:
    """The tags a release puts on a newly registered version.

    Args:
        repo_id: the source repo of the weights.
        commit: the commit they were fetched at.
        onnx_options: the ONNX export options as JSON ("" for a transformers wrapper).
        passed: the validation verdict (what promotion checks).
        summary: the validation summary, cut to a tag value's length.
    """
    return {
        SOURCE_REPO_ID: repo_id,
        SOURCE_COMMIT: commit,
        ONNX_OPTIONS: onnx_options,
        VALIDATION_PASSED: str(passed).lower(),
        VALIDATION_SUMMARY: summary[:MAX_VALUE_CHARS],
    }
