"""The manifest a conversion writes: valid against the schema, refused with the field's path when broken,
and its test vectors reproduce on the device runtime."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

import edge_runtime
from edge_runtime.bundle import open_bundle, validate_manifest, write_manifest
from edge_runtime.errors import BundleError


@pytest.mark.parametrize("path, value, where", [
    (("artifacts", 0, "quantization"), "int4", "artifacts/0/quantization"),
    (("artifacts", 0, "sha256"), "xyz", "artifacts/0/sha256"),
    (("input_schema", "kind"), "audio", "input_schema/kind"),
    (("reference_profile", "features", 0, "hist"), [-1, 2], "reference_profile/features/0/hist/0"),
    (("version",), "1.0", "version"),
])
def test_a_broken_manifest_is_refused_with_the_field_path(bc_rf_bundle, tmp_path, path, value, where):
    doc = copy.deepcopy(open_bundle(bc_rf_bundle).manifest)
    validate_manifest(doc)  # the converted one is valid
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(BundleError, match=f"at {where}"):
        write_manifest(tmp_path, doc)
    # and a runtime refuses the same edit made by hand
    copy_dir = tmp_path / "edited"
    shutil.copytree(bc_rf_bundle, copy_dir)
    (copy_dir / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=f"at {where}"):
        open_bundle(copy_dir)


def test_int8_tensor_quantization_is_recorded(digits_cnn_bundle):
    art = open_bundle(digits_cnn_bundle).artifact("model.int8.tflite")
    for t in art["inputs"] + art["outputs"]:
        assert t["dtype"] == "int8"
        assert t["quantization"]["scale"] > 0 and -128 <= t["quantization"]["zero_point"] <= 127


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["bc_mlp_bundle", "digits_cnn_bundle", "bc_rf_bundle"])
def test_every_artifacts_test_vectors_reproduce_on_the_device_runtime(fixture, request):
    bundle_dir = request.getfixturevalue(fixture)
    manifest = open_bundle(bundle_dir).manifest
    for vec in manifest["test_vectors"]:
        model = edge_runtime.load(bundle_dir, artifact=vec["artifact"])
        got = model.predict(np.asarray(vec["inputs"], dtype=np.float32))
        np.testing.assert_allclose(got, np.asarray(vec["expected"]), atol=vec["atol"], err_msg=vec["artifact"])


def test_reference_profile_follows_the_binning_rule(bc_rf_bundle, reference_data):
    prof = open_bundle(bc_rf_bundle).manifest["reference_profile"]
    X = reference_data["breast_cancer"].X_train
    for i, feat in enumerate(prof["features"]):
        edges = np.asarray(feat["bin_edges"])
        assert (np.diff(edges) > 0).all() and len(edges) <= 9
        counts = np.bincount(np.searchsorted(edges, X[:, i].astype(np.float64), side="left"), minlength=len(edges) + 1)
        assert counts.tolist() == feat["hist"]
        assert feat["min"] <= feat["mean"] <= feat["max"] and feat["nan_rate"] == 0.0
