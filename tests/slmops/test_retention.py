"""Retention planning (pure): what is kept, what is pruned, and shared ONNX folders."""

from __future__ import annotations

import pytest

from slmops.retention import StoredVersion, plan_retention

pytestmark = pytest.mark.unit


def version(name: str, n: int, stage: str = "Archived", **fields) -> StoredVersion:
    defaults = {"model_id": f"m-{name}-{n}", "artifact_uri": f"file:///store/{name}/{n}"}
    return StoredVersion.model_validate(
        {"name": name, "version": n, "stage": stage, **defaults, **fields}
    )


def decisions(plan) -> dict[tuple[str, int], tuple[bool, str | None]]:
    return {(d.name, d.version): (d.prune, d.delete_onnx_uri) for d in plan.decisions}


def test_plan_keeps_the_newest_production_staging_aliased_and_unpromoted_versions():
    versions = [
        version("m", 1, aliases=("golden",)),
        version("m", 2),
        version("m", 3, stage="None"),
        version("m", 4, stage="Staging"),
        version("m", 5),
        version("m", 6, stage="Production"),
        version("m", 7, stage="Archived"),
        version("m", 8, pruned=True),
        version("other", 1),  # not asked about
    ]
    plan = plan_retention(versions, ["m"], keep_last=2)
    reasons = {d.version: d.reason for d in plan.decisions if d.name == "m"}
    assert [d.version for d in plan.pruned] == [5, 2]
    assert reasons[8] == "already pruned"  # newest by number, but holds no slot
    assert reasons[7] == reasons[6] == "one of the newest 2 released"
    assert reasons[4] == "in Staging" and reasons[1] == "has alias @golden"
    assert reasons[3] == "stage None, not Archived"
    assert all(d.name == "m" for d in plan.decisions)
    # A failed newest release (stage None) takes no slot from the last rollback target.
    failed = [version("m", 1), version("m", 2, stage="Production"), version("m", 3, stage="None")]
    assert plan_retention(failed, ["m"], keep_last=2).pruned == ()
    with pytest.raises(ValueError, match="at least 1"):
        plan_retention(versions, ["m"], keep_last=0)


def test_plan_deletes_a_shared_onnx_folder_only_with_its_last_user():
    a, b = "file:///runs/a/artifacts/onnx_model", "file:///runs/b/artifacts/onnx_model"
    versions = [
        # Release 1: both ONNX wrappers name folder a; the chat one keeps an alias.
        version("p", 1, onnx_uri=a),
        version("c", 1, onnx_uri=a, aliases=("golden",)),
        # Release 2: folder b, pruned from both models: deleted once.
        version("p", 2, onnx_uri=b),
        version("c", 2, onnx_uri=b),
        # Release 3 shares release 2's model files in `c` (a copied version): c v2 stays whole.
        *(version(n, 3, onnx_uri="file:///runs/c/onnx_model") for n in ("p", "c")),
        version("c", 4, stage="Production", model_id="m-c-2"),
        version("p", 4, stage="Production"),
    ]
    plan = plan_retention(versions, ["p", "c"], keep_last=2)
    assert decisions(plan) == {
        ("p", 4): (False, None),
        ("p", 3): (False, None),
        ("p", 2): (True, None),  # folder b: c v2 stays whole (below)
        ("p", 1): (True, None),  # folder a: c v1 (aliased) still uses it
        ("c", 4): (False, None),
        ("c", 3): (False, None),
        ("c", 2): (False, None),
        ("c", 1): (False, None),
    }
    assert "c v4" in next(d.reason for d in plan.decisions if (d.name, d.version) == ("c", 2))
    # c v2's files are c v4's too: c v2 stays whole, so folder b stays and p v2 goes alone.
    assert "ONNX folder stays" in next(d.reason for d in plan.pruned if d.version == 2)
    # An in-flight release's logged wrapper that names folder b protects it as well.
    versions_c2_gone = [v for v in versions if (v.name, v.version) != ("c", 2)]
    assert decisions(plan_retention(versions_c2_gone, ["p", "c"], 2))[("p", 2)] == (True, b)
    assert decisions(plan_retention(versions_c2_gone, ["p", "c"], 2, {b}))[("p", 2)] == (
        True,
        None,
    )
