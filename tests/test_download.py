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
    return zpath, checksums(zpath)


def checksums(zpath):
    data = zpath.read_bytes()
    return {zpath.name: {"size": len(data), "md5": hashlib.md5(data).hexdigest()}}


def fetch_luad(tmp_path, zpath, sums):
    return download.fetch_classes(["LUAD"], tf.FOLDERS, tmp_path / "data", url_pattern=zpath.parent.as_uri() + "/{name}",
                                  checksums=sums)


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("with_class_folder", [True, False])
def test_fetch_verify_unpack_into_tcga_ut_layout(tmp_path, with_class_folder):
    zpath, sums = class_zip(tmp_path, with_class_folder)
    assert fetch_luad(tmp_path, zpath, sums) == {"LUAD": 5}
    tiles = sorted((tmp_path / "data/tcga-ut/Lung_adenocarcinoma/0").glob("TCGA-*/*.jpg"))
    assert len(tiles) == 5 and not (tmp_path / "data/.downloads/Lung_adenocarcinoma.zip").exists()


def test_checksum_mismatch_is_refused(tmp_path):
    zpath, sums = class_zip(tmp_path, True)
    sums[zpath.name]["md5"] = "0" * 32
    with pytest.raises(MediError, match=r"MD5 .* expected 0{32}; delete it and download again"):
        fetch_luad(tmp_path, zpath, sums)
    assert not (tmp_path / "data/tcga-ut/Lung_adenocarcinoma").exists()


def test_size_mismatch_is_refused(tmp_path):
    zpath, sums = class_zip(tmp_path, True)
    size = sums[zpath.name]["size"]
    sums[zpath.name]["size"] = size + 1
    with pytest.raises(MediError, match=rf"Lung_adenocarcinoma.zip: size {size} bytes, expected {size + 1}; delete it"):
        fetch_luad(tmp_path, zpath, sums)
    assert not (tmp_path / "data/tcga-ut").exists()


def test_unknown_class_and_unlisted_file(tmp_path):
    with pytest.raises(MediError, match=r"unknown class\(es\) \['XYZ'\]"):
        download.fetch_classes(["XYZ"], tf.FOLDERS, tmp_path, checksums={})
    with pytest.raises(MediError, match="is not a file of the Zenodo record"):
        download.fetch_classes(["LUAD"], tf.FOLDERS, tmp_path, checksums={"Other.zip": {"size": 1, "md5": None}})


@pytest.mark.parametrize("member", ["../../outside.jpg", "0/../../../outside.jpg", "Lung_adenocarcinoma/../../outside.jpg",
                                    "{tmp}/outside.jpg"])
def test_zip_slip_is_refused_and_nothing_lands_outside(tmp_path, member):
    zips, tiles_root = tmp_path / "zips", tmp_path / "a/b/tiles"
    zips.mkdir()
    evil = zips / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("0/TCGA-05-4244-01Z-00-DX1/0_0_1.jpg", b"a good member first")
        zf.writestr(member.format(tmp=tmp_path), b"x")
    before = files_under(tmp_path)
    with pytest.raises(MediError, match="would leave the target folder"):
        download.unpack(evil, tiles_root, "Lung_adenocarcinoma")
    assert files_under(tmp_path) == before                       # not a byte written anywhere, the good member neither


def corrupt_zip(path):
    """A zip whose one member fails its CRC (same size, one byte changed): a damaged download."""
    payload = b"JPEG bytes of a tile" * 10
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("0/TCGA-05-4244-01Z-00-DX1/0_0_1.jpg", payload)
    path.write_bytes(path.read_bytes().replace(payload, payload[:-1] + b"?"))
    return path


def test_garbage_corrupt_and_empty_zips_are_refused_and_leave_nothing(tmp_path):
    tiles_root = tmp_path / "data/tcga-ut"
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip")
    corrupt = corrupt_zip(tmp_path / "corrupt.zip")
    no_tiles = tmp_path / "no_tiles.zip"
    with zipfile.ZipFile(no_tiles, "w") as zf:
        zf.writestr("0/TCGA-05-4244-01Z-00-DX1/notes.txt", b"no tiles here")
        zf.writestr("__MACOSX/0/._0_0_1.jpg", b"resource fork")
    before = files_under(tmp_path)
    with pytest.raises(MediError, match=r"garbage.zip: not a valid zip .*; delete it and download again"):
        download.unpack(garbage, tiles_root, "Lung_adenocarcinoma")
    with pytest.raises(MediError, match=r"corrupt.zip: member 0/TCGA-05-4244-01Z-00-DX1/0_0_1.jpg is corrupt; delete"):
        download.unpack(corrupt, tiles_root, "Lung_adenocarcinoma")
    with pytest.raises(MediError, match=r"no_tiles.zip: no JPEG tiles inside; expected <level>/<slide_barcode>/<tile>.jpg"):
        download.unpack(no_tiles, tiles_root, "Lung_adenocarcinoma")
    assert files_under(tmp_path) == before


def test_a_corrupt_download_with_the_published_checksum_is_not_unpacked(tmp_path):
    """Zenodo's MD5 matches what was downloaded, yet a member fails its CRC: fetch stops before unpacking."""
    (tmp_path / "zenodo").mkdir()
    corrupt = corrupt_zip(tmp_path / "zenodo/Lung_adenocarcinoma.zip")
    with pytest.raises(MediError, match="is corrupt; delete the zip and download again"):
        fetch_luad(tmp_path, corrupt, checksums(corrupt))
    assert files_under(tmp_path / "data") == [".downloads/Lung_adenocarcinoma.zip"]


def test_partial_file_is_replaced_when_the_server_ignores_range(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes(range(256)) * 100)
    dest = tmp_path / "out" / "blob.bin"
    dest.parent.mkdir()
    # file:// ignores Range, so the whole file is fetched again and the partial one replaced, not appended to.
    (dest.parent / "blob.bin.part").write_bytes(b"\x00" * 10)
    download.fetch(src.as_uri(), dest)
    assert dest.read_bytes() == src.read_bytes()


BLOB = bytes(range(256)) * 1000


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one blob on loopback, honouring `Range: bytes=N-` like Zenodo does; records the requested starts on
    its server (`server.ranges`), so no state outlives the test."""

    def do_GET(self):  # noqa: N802 - http.server API
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        self.server.ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(BLOB) - start))
        self.end_headers()
        self.wfile.write(BLOB[start:])

    def log_message(self, *args):
        pass


def test_interrupted_download_resumes_with_a_range_request(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    server.ranges = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dest = tmp_path / "blob.bin"
        (tmp_path / "blob.bin.part").write_bytes(BLOB[:100_000])   # an interrupted earlier attempt
        download.fetch(f"http://127.0.0.1:{server.server_port}/blob", dest)
        assert server.ranges == [100_000]
        assert dest.read_bytes() == BLOB
    finally:
        server.shutdown()
        server.server_close()
