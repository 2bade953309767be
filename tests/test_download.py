"""`make tcga-ut` without the network: fetch (file:// URL), verify and unpack a Zenodo-like class zip."""
from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile

import pytest

import tcga_fixture as tf
from medi import download
from medi.errors import MediError


def class_zip(tmp_path, with_class_folder: bool):
    fx = tf.build(tmp_path / "src", [tf.FixtureSlide("LUAD", "05", "4244", tiles=3),
                                     tf.FixtureSlide("LUAD", "44", "2655", tiles=2)])
    zpath = tmp_path / "zenodo" / "Lung_adenocarcinoma.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted((fx.tiles_root / "Lung_adenocarcinoma").rglob("*.jpg")):
            rel = f.relative_to(fx.tiles_root if with_class_folder else fx.tiles_root / "Lung_adenocarcinoma")
            zf.write(f, str(rel))
    data = zpath.read_bytes()
    return zpath, {zpath.name: {"size": len(data), "md5": hashlib.md5(data).hexdigest()}}


@pytest.mark.parametrize("with_class_folder", [True, False])
def test_fetch_verify_unpack_into_tcga_ut_layout(tmp_path, with_class_folder):
    zpath, sums = class_zip(tmp_path, with_class_folder)
    counts = download.fetch_classes(["LUAD"], tf.FOLDERS, tmp_path / "data",
                                    url_pattern=zpath.parent.as_uri() + "/{name}", checksums=sums)
    assert counts == {"LUAD": 5}
    tiles = sorted((tmp_path / "data/tcga-ut/Lung_adenocarcinoma/0").glob("TCGA-*/*.jpg"))
    assert len(tiles) == 5 and not (tmp_path / "data/.downloads/Lung_adenocarcinoma.zip").exists()


def test_checksum_mismatch_is_refused(tmp_path):
    zpath, sums = class_zip(tmp_path, True)
    sums[zpath.name]["md5"] = "0" * 32
    with pytest.raises(MediError, match=r"MD5 .* expected 0{32}; delete it and download again"):
        download.fetch_classes(["LUAD"], tf.FOLDERS, tmp_path / "data", url_pattern=zpath.parent.as_uri() + "/{name}",
                               checksums=sums)
    assert not (tmp_path / "data/tcga-ut/Lung_adenocarcinoma").exists()


def test_unknown_class_and_unlisted_file(tmp_path):
    with pytest.raises(MediError, match=r"unknown class\(es\) \['XYZ'\]"):
        download.fetch_classes(["XYZ"], tf.FOLDERS, tmp_path, checksums={})
    with pytest.raises(MediError, match="is not a file of the Zenodo record"):
        download.fetch_classes(["LUAD"], tf.FOLDERS, tmp_path, checksums={"Other.zip": {"size": 1, "md5": None}})


def test_zip_slip_and_garbage_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../outside.jpg", b"x")
    with pytest.raises(MediError, match="would leave the target folder"):
        download.unpack(evil, tmp_path / "tiles", "Lung_adenocarcinoma")
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(MediError, match="not a valid zip"):
        download.unpack(garbage, tmp_path / "tiles", "Lung_adenocarcinoma")
    assert not (tmp_path.parent / "outside.jpg").exists()


def test_partial_file_is_replaced_when_the_server_ignores_range(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 100)
    dest = tmp_path / "out" / "blob.bin"
    dest.parent.mkdir()
    # file:// ignores Range, so the whole file is fetched again and the partial one replaced, not appended to.
    (dest.parent / "blob.bin.part").write_bytes(b"\x00" * 10)
    download.fetch(src.as_uri(), dest)
    assert dest.read_bytes() == src.read_bytes()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one blob on loopback, honouring `Range: bytes=N-` like Zenodo does."""
    blob = bytes(range(256)) * 1000
    ranges: list = []

    def do_GET(self):  # noqa: N802 - http.server API
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        self.ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.blob) - start))
        self.end_headers()
        self.wfile.write(self.blob[start:])

    def log_message(self, *args):
        pass


def test_interrupted_download_resumes_with_a_range_request(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dest = tmp_path / "blob.bin"
        (tmp_path / "blob.bin.part").write_bytes(_RangeHandler.blob[:100_000])   # an interrupted earlier attempt
        download.fetch(f"http://127.0.0.1:{server.server_port}/blob", dest)
        assert _RangeHandler.ranges == [100_000]
        assert dest.read_bytes() == _RangeHandler.blob
    finally:
        server.shutdown()
