"""Bundles from strangers: closed archives, no temporary folders left, signed by default, altered models caught."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

import edge_runtime
from edge_runtime import signing
from edge_runtime.bundle import MANIFEST_FILE, TEMP_PREFIX, open_bundle, pack, write_manifest
from edge_runtime.errors import BundleError, ModelFormatError, QualityCheckError, VerificationError
from edge_runtime.slots import NO_TRUSTED_KEY, BundleSlots
from helpers import eventually, stop_agent
from helpers.bundle_variants import variant

ROOT = Path(__file__).resolve().parents[2]
BOMB_BYTES = 64 << 20   # zeros: about 64 KB once gzipped


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The fleet's signing key pair (private, public), made once for these tests."""
    return signing.generate_key_pair(tmp_path_factory.mktemp("fleet-keys"))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temp dir of this test's own, so counting ``edgeops-bundle-*`` folders is not disturbed by anyone else."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def unpacked_folders(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(TEMP_PREFIX))


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def add_zeros(tar: tarfile.TarFile, name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size

    class Zeros:
        def read(self, n: int) -> bytes:   # what tarfile asks for, block by block
            return bytes(n)

    tar.addfile(info, Zeros())


def archive(path: Path, entries) -> Path:
    """Write a .tar.gz whose entries come from ``entries(tar)`` (fast compression: zeros shrink anyway)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        entries(tar)
    return path


def bundle_entries(bundle: Path):
    """The bundle's own files, manifest and signature first (as pack writes them)."""
    names = [MANIFEST_FILE, "manifest.sig"] + sorted(p.name for p in bundle.iterdir()
                                                      if p.name not in (MANIFEST_FILE, "manifest.sig"))
    return [bundle / n for n in names if (bundle / n).exists()]


UNPACK_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write over the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
from edge_runtime.bundle import open_bundle
from edge_runtime.errors import EdgeOpsError
try:
    open_bundle(sys.argv[1], public_key=sys.argv[2], extract_to=sys.argv[3])
    print("accepted")
except EdgeOpsError as exc:
    print(type(exc).__name__, exc)
"""


def unpack_with_file_limit(archive_path: Path, pub: Path, dest: Path, limit: int) -> str:
    """Open a bundle archive in a child that cannot write any file larger than ``limit`` bytes."""
    res = subprocess.run([sys.executable, "-c", UNPACK_UNDER_A_FILE_SIZE_LIMIT, str(archive_path), str(pub), str(dest),
                          str(limit)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


# -- closed bundles -----------------------------------------------------------------------------


def test_a_signed_bundle_carrying_a_zero_bomb_and_a_script_is_refused_before_they_are_written(bc_rf_bundle, keys,
                                                                                              tmp_path):
    key, pub = keys
    signed = variant(bc_rf_bundle, tmp_path / "v", "1.0.1", key)

    def entries(tar):
        for f in bundle_entries(signed):
            tar.add(f, arcname=f.name)
        add_zeros(tar, "zeros.bin", BOMB_BYTES)
        add_bytes(tar, "run.sh", b"#!/bin/sh\necho owned\n", mode=0o755)

    bomb = archive(tmp_path / "bomb.tar.gz", entries)
    assert bomb.stat().st_size < BOMB_BYTES // 100
    listed = max(a["size_bytes"] for a in json.loads((signed / MANIFEST_FILE).read_text())["artifacts"])
    # a child that cannot write any file bigger than the largest listed artifact (plus the manifest):
    # if the unpacking wrote the bomb, it would fail with "File too large" instead of naming the entry
    limit = listed + (signed / MANIFEST_FILE).stat().st_size + 4096
    outcome = unpack_with_file_limit(bomb, pub, tmp_path / "device", limit)
    assert outcome.startswith("BundleError") and "'zeros.bin'" in outcome and "not listed" in outcome, outcome
    assert not (tmp_path / "device" / "zeros.bin").exists() and not (tmp_path / "device" / "run.sh").exists()

    slots = BundleSlots(tmp_path / "state", public_key=str(pub))      # the device refuses and keeps nothing
    slots.install_initial(variant(bc_rf_bundle, tmp_path / "v1", "1.0.0", key))
    result = slots.flash(bomb)
    assert not result.ok and "zeros.bin" in result.message
    kept = sum(f.stat().st_size for f in (tmp_path / "state").rglob("*") if f.is_file())
    assert kept < 2 * sum(f.stat().st_size for f in signed.iterdir())
    assert not list(slots.staging.iterdir())


def test_an_artifact_entry_larger_than_its_listed_size_is_refused_at_its_header(bc_rf_bundle, keys, tmp_path):
    key, pub = keys
    signed = variant(bc_rf_bundle, tmp_path / "v", "1.0.1", key)

    def entries(tar):
        for f in bundle_entries(signed):
            if f.name == "model.onnx":
                add_zeros(tar, "model.onnx", f.stat().st_size + BOMB_BYTES)
            else:
                tar.add(f, arcname=f.name)

    bomb = archive(tmp_path / "big.tar.gz", entries)
    outcome = unpack_with_file_limit(bomb, pub, tmp_path / "device", 1 << 20)
    assert outcome.startswith("VerificationError") and "the manifest lists" in outcome, outcome


def test_an_archive_whose_headers_claim_more_than_the_manifest_allows_is_refused_while_reading_them(bc_rf_bundle,
                                                                                                   tmp_path):
    def entries(tar):
        for f in bundle_entries(bc_rf_bundle):
            info = tar.gettarinfo(f, arcname=f.name)
            if f.name == "model.onnx":   # a pax record tarfile would read whole into memory
                info.pax_headers = {"comment": "0" * (BOMB_BYTES + (1 << 20))}
            with open(f, "rb") as fh:
                tar.addfile(info, fh)

    with tarfile.open(tmp_path / "pax.tar.gz", "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as tar:
        entries(tar)
    with pytest.raises(BundleError, match="holds more than its manifest lists"):
        open_bundle(tmp_path / "pax.tar.gz")


def _symlink(tar):
    info = tarfile.TarInfo("model.onnx")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _hardlink(tar):
    info = tarfile.TarInfo("model.onnx")
    info.type, info.linkname = tarfile.LNKTYPE, MANIFEST_FILE
    tar.addfile(info)


def _device(tar):
    info = tarfile.TarInfo("model.onnx")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    tar.addfile(info)


def _fifo(tar):
    info = tarfile.TarInfo("model.onnx")
    info.type = tarfile.FIFOTYPE
    tar.addfile(info)


@pytest.mark.parametrize("make,message", [
    (_symlink, "is a symlink"),
    (_hardlink, "is a hard link"),
    (_device, "is a device"),
    (_fifo, "is a FIFO"),
    (lambda tar: add_bytes(tar, "/tmp/evil", b"x"), "unsafe entry"),
    (lambda tar: add_bytes(tar, "../evil", b"x"), "unsafe entry"),
    (lambda tar: add_bytes(tar, "sub/model.onnx", b"x"), "sub-folder"),
    (lambda tar: add_bytes(tar, MANIFEST_FILE, b"{}"), "appears twice"),
])
def test_links_devices_fifos_and_paths_out_of_the_bundle_are_refused(bc_rf_bundle, tmp_path, private_tmp, make,
                                                                    message):
    manifest = (bc_rf_bundle / MANIFEST_FILE).read_bytes()

    def entries(tar):
        add_bytes(tar, MANIFEST_FILE, manifest)
        make(tar)

    bad = archive(tmp_path / "bad.tar.gz", entries)
    with pytest.raises(BundleError, match=message):
        open_bundle(bad)
    assert unpacked_folders(private_tmp) == []


def test_an_archive_whose_manifest_comes_after_its_artifacts_is_refused(bc_rf_bundle, tmp_path):
    def entries(tar):
        for f in reversed(bundle_entries(bc_rf_bundle)):
            tar.add(f, arcname=f.name)

    with pytest.raises(BundleError, match="comes before manifest.json"):
        open_bundle(archive(tmp_path / "late.tar.gz", entries))


def test_archives_pack_writes_and_archives_of_one_folder_open(bc_rf_bundle, keys, tmp_path, private_tmp):
    key, pub = keys
    signed = variant(bc_rf_bundle, tmp_path / "v", "1.0.1", key)
    with tarfile.open(tmp_path / "folder.tar.gz", "w:gz") as tar:
        tar.add(signed, arcname="v")
    for path in (pack(signed, tmp_path / "flat.tar.gz"), tmp_path / "folder.tar.gz"):
        b = open_bundle(path, public_key=str(pub))
        assert b.signed and b.version == "1.0.1" and sorted(p.name for p in b.root.iterdir()) == sorted(
            p.name for p in signed.iterdir())
        b.cleanup()
    assert unpacked_folders(private_tmp) == []


def test_a_bundle_directory_with_an_unlisted_file_is_refused_by_name(bc_rf_bundle, tmp_path):
    d = variant(bc_rf_bundle, tmp_path / "v", "1.0.1")
    (d / "run.sh").write_text("#!/bin/sh\n")
    with pytest.raises(BundleError, match="'run.sh' is not listed in the manifest"):
        edge_runtime.load(d)
    (d / "run.sh").unlink()
    os.symlink(d / "model.onnx", d / "model.copy")
    with pytest.raises(BundleError, match="'model.copy' is not listed"):
        open_bundle(d)


# -- no temporary folders left ------------------------------------------------------------------


def test_loading_inspecting_and_sending_archives_leaves_no_temporary_folders(bc_rf_bundle, keys, tmp_path,
                                                                            private_tmp):
    from devices.rollout import BundleImage

    key, pub = keys
    good = pack(variant(bc_rf_bundle, tmp_path / "good", "1.0.0", key), tmp_path / "good.tar.gz")
    tampered_dir = variant(bc_rf_bundle, tmp_path / "tampered", "1.0.1", key)
    data = bytearray((tampered_dir / "model.onnx").read_bytes())
    data[100] ^= 1
    (tampered_dir / "model.onnx").write_bytes(bytes(data))
    tampered = pack(tampered_dir, tmp_path / "tampered.tar.gz")
    assert unpacked_folders(private_tmp) == []

    model = edge_runtime.load(good, public_key=str(pub))
    assert model.predict_labels(np.asarray(json.loads((tmp_path / "good" / MANIFEST_FILE).read_text())
                                           ["test_vectors"][0]["inputs"], dtype=np.float32)).shape == (5,)
    for attempt in (lambda: edge_runtime.load(tampered), lambda: edge_runtime.load(good, public_key=str(
            signing.generate_key_pair(tmp_path / "other")[1])), lambda: BundleImage.from_path(tampered)):
        with pytest.raises(VerificationError):
            attempt()
    assert BundleImage.from_path(good, str(pub)).version == "1.0.0"
    env = {**os.environ, "TMPDIR": str(private_tmp), "PYTHONPATH": str(ROOT)}
    for path, code in ((good, 0), (tampered, 4)):
        res = subprocess.run([sys.executable, "-m", "edgeops", "inspect", str(path)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert res.returncode == code, res.stderr[-1000:]
    slots = BundleSlots(tmp_path / "state", public_key=str(pub))
    slots.install_initial(good)
    assert not slots.flash(tampered).ok
    assert unpacked_folders(private_tmp) == []
    assert not list(slots.staging.iterdir())


# -- signed by default --------------------------------------------------------------------------


def test_a_device_without_a_trusted_key_refuses_flashes_unless_told_to_allow_unsigned(bc_rf_bundle, keys, tmp_path):
    key, pub = keys
    v1 = variant(bc_rf_bundle, tmp_path / "v1", "1.0.0")
    unsigned = pack(variant(bc_rf_bundle, tmp_path / "v2", "1.1.0"), tmp_path / "v2.tar.gz")
    other_key, _ = signing.generate_key_pair(tmp_path / "other")
    foreign = pack(variant(bc_rf_bundle, tmp_path / "v3", "1.2.0", other_key), tmp_path / "v3.tar.gz")

    default = BundleSlots(tmp_path / "default")
    default.install_initial(v1)                              # the operator's own bundle, given locally
    r = default.flash(unsigned)
    assert not r.ok and r.message == f"refused: {NO_TRUSTED_KEY}"

    keyed = BundleSlots(tmp_path / "keyed", public_key=str(pub))
    keyed.install_initial(variant(bc_rf_bundle, tmp_path / "s1", "1.0.0", key))
    assert "unsigned bundle" in keyed.flash(unsigned).message
    assert "signed by key" in keyed.flash(foreign).message

    allowing = BundleSlots(tmp_path / "allowing", allow_unsigned=True)
    allowing.install_initial(v1)
    assert allowing.flash(unsigned).ok
    with pytest.raises(ValueError, match="choose one"):
        BundleSlots(tmp_path / "both", public_key=str(pub), allow_unsigned=True)


def test_a_flash_command_to_a_device_without_a_key_is_answered_with_the_reason(bc_rf_bundle, tmp_path):
    from edge_runtime.commands import CommandHandler

    slots = BundleSlots(tmp_path / "state")
    slots.install_initial(variant(bc_rf_bundle, tmp_path / "v1", "1.0.0"))
    results: list[dict] = []
    handler = CommandHandler(slots, results.append, lambda *a: None, "dev-1")
    try:
        handler.submit(json.dumps({"type": "flash_begin", "id": "t1", "total": 2, "size": 10,
                                   "sha256": "0" * 64}).encode())
        handler.submit(json.dumps({"type": "flash_chunk", "id": "t1", "index": 0, "sha256": "0" * 64,
                                   "data": ""}).encode())
        handler.submit(json.dumps({"type": "flash_url", "id": "t2", "url": "http://127.0.0.1:9/x.tar.gz",
                                   "size": 10, "sha256": "0" * 64}).encode())
        assert eventually(lambda: len(results) >= 2, 10)
    finally:
        handler.stop()
    assert [(r["id"], r["ok"], r["message"]) for r in results] == [("t1", False, f"refused: {NO_TRUSTED_KEY}"),
                                                                   ("t2", False, f"refused: {NO_TRUSTED_KEY}")]
    assert not list(slots.staging.iterdir())


def test_an_agent_started_without_a_key_tells_the_operator_why_it_refuses_a_flash(mosquitto, bc_mlp_bundle,
                                                                                  reference_data, tmp_path):
    from devices.rollout import inventory
    from edge_runtime.mqtt import parse_broker_url

    stream = tmp_path / "x.npy"
    np.save(stream, reference_data["breast_cancer"].X_train)
    v2 = variant(bc_mlp_bundle, tmp_path / "v2", "1.1.0")
    agent = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "pi-1",
                              "--fleet", "lab", "--broker", mosquitto.url, "--input", str(stream), "--loop",
                              "--rate", "100", "--window-size", "50", "--state-dir", str(tmp_path / "pi-1"),
                              "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = parse_broker_url(mosquitto.url)
        assert eventually(lambda: (inventory(address, "lab", wait=0.5)[0].get("pi-1") or {}).get("online"), 30)
        res = subprocess.run([sys.executable, "-m", "edgeops", "flash", str(v2), "--device", "pi-1", "--fleet", "lab",
                              "--broker", mosquitto.url, "--json", "--timeout", "30"],
                             capture_output=True, text=True, timeout=120)
        code, stdout, stderr = res.returncode, res.stdout, res.stderr
    finally:
        out = stop_agent(agent)
    assert code == 4, stderr[-2000:] + out[-3000:]
    assert json.loads(stdout)["message"] == f"refused: {NO_TRUSTED_KEY}"
    assert NO_TRUSTED_KEY in out and "Traceback" not in out


# -- altered models -----------------------------------------------------------------------------


def _rehash(bundle: Path, file: str) -> None:
    """Update the manifest's pin of ``file`` to its new bytes (what an attacker without the key can do)."""
    doc = json.loads((bundle / MANIFEST_FILE).read_text())
    data = (bundle / file).read_bytes()
    for art in doc["artifacts"]:
        if art["file"] == file:
            art["sha256"], art["size_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    write_manifest(bundle, doc)


def _scale_last_layer(value):
    def mutate(model):
        import onnx.numpy_helper as nh

        init = [i for i in model.graph.initializer if nh.to_array(i).ndim == 2][-1]
        init.CopyFrom(nh.from_array((nh.to_array(init) * value).astype(np.float32), init.name))
    return mutate


@pytest.mark.parametrize("mutation,what", [(_scale_last_layer(-1.0), "output differs"),
                                           (_scale_last_layer(np.nan), "non-finite outputs")])
def test_an_onnx_model_altered_with_its_hash_updated_is_caught_by_its_test_vectors(bc_mlp_bundle, tmp_path, mutation,
                                                                                   what):
    import onnx

    d = variant(bc_mlp_bundle, tmp_path / "v", "1.0.1")
    model = onnx.load(d / "model.onnx")
    mutation(model)
    onnx.save(model, d / "model.onnx")
    _rehash(d, "model.onnx")
    with pytest.raises(QualityCheckError, match=what):
        edge_runtime.load(d, artifact="model.onnx")
    loaded = edge_runtime.load(d, artifact="model.onnx", verify_vectors=False)   # opted out: it loads
    assert loaded.path.name == "model.onnx"
    res = subprocess.run([sys.executable, "-m", "edgeops", "inspect", str(d)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0   # inspect reads the manifest only


def test_a_tflite_model_with_a_mangled_tensor_name_is_a_model_format_error(bc_mlp_bundle, tmp_path):
    data = bytearray((bc_mlp_bundle / "model.int8.tflite").read_bytes())
    name = b"StatefulPartitionedCall_1:0"     # the output tensor's name: decoded by get_output_details
    at = bytes(data).find(name)
    assert at > 0
    data[at] = 0xFF
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(data))
    res = subprocess.run([sys.executable, "-m", "edgeops", "inspect", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "UnicodeDecodeError" in res.stderr and "bad.tflite" in res.stderr and "Traceback" not in res.stderr
    d = variant(bc_mlp_bundle, tmp_path / "v", "1.0.1")
    shutil.copyfile(bad, d / "model.int8.tflite")
    _rehash(d, "model.int8.tflite")
    with pytest.raises(ModelFormatError, match="model.int8.tflite"):
        edge_runtime.load(d, artifact="model.int8.tflite")


def test_a_broken_onnx_graph_is_a_model_format_error(bc_rf_bundle, tmp_path):
    import onnx

    model = onnx.load(bc_rf_bundle / "model.onnx")
    model.graph.node[0].input[0] = "no_such_tensor"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    with pytest.raises(ModelFormatError, match="ONNX Runtime cannot load it"):
        edge_runtime.load(bad)
