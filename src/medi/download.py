"""Fetch TCGA-UT classes from Zenodo (record 5889558), verify them and unpack them into the TCGA-UT layout.

`make tcga-ut CLASSES="LUAD LUSC"` calls `medi fetch-tcga-ut` and then `dvc add data`, so the download is
versioned by `data.dvc`. Each class is one zip, `<Class_folder>.zip`; downloads resume after an
interruption (HTTP Range), are checked against the size and MD5 that Zenodo publishes for the file, and
are unpacked to `data/tcga-ut/<Class_folder>/<level>/<slide_barcode>/<tile>.jpg`. The GDC slide
metadata is not on Zenodo: export it from the GDC portal to `data/gdc_metadata.csv` (README, 'Real data').
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from medi.errors import MediError

log = logging.getLogger(__name__)

RECORD_API = "https://zenodo.org/api/records/5889558"
FILE_URL = RECORD_API + "/files/{name}/content"
BLOCK = 1 << 20


def record_checksums(api_url: str = RECORD_API, timeout: float = 30) -> dict[str, dict]:
    """{file name: {"size": int, "md5": str}} as Zenodo publishes them for the record."""
    try:
        with urllib.request.urlopen(api_url, timeout=timeout) as resp:
            record = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        raise MediError(f"cannot reach {api_url} ({exc}); TCGA-UT needs internet access to download") from None
    out = {}
    for f in record.get("files", []):
        algo, _, digest = str(f.get("checksum", "")).partition(":")
        out[f["key"]] = {"size": int(f.get("size", -1)), "md5": digest if algo == "md5" else None}
    return out


def fetch(url: str, dest: Path, timeout: float = 60) -> Path:
    """Download `url` to `dest`, resuming from `dest.part` when the server honours Range requests."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resumed = have and getattr(resp, "status", 200) == 206
            total = int(resp.headers.get("Content-Length") or 0) + (have if resumed else 0)
            with open(part, "ab" if resumed else "wb") as f, tqdm(total=total or None, initial=have if resumed else 0,
                                                                  unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := resp.read(BLOCK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise MediError(f"download of {url} failed ({exc}); run the command again to resume") from None
    os.replace(part, dest)
    return dest


def verify(path: Path, size: int | None, md5: str | None) -> None:
    if size is not None and size >= 0 and path.stat().st_size != size:
        raise MediError(f"{path}: size {path.stat().st_size} bytes, expected {size}; delete it and download again")
    if md5:
        h = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(BLOCK):
                h.update(chunk)
        if h.hexdigest() != md5:
            raise MediError(f"{path}: MD5 {h.hexdigest()}, expected {md5}; delete it and download again")


def unpack(zip_path: Path, tiles_root: Path, folder: str) -> int:
    """Unpack one class zip into `tiles_root/folder/...`; returns the number of JPEG tiles.

    The zip may hold `<folder>/<level>/...` or `<level>/...` at its top; both land in the same layout.
    Members that would escape the target folder are refused.
    """
    target = tiles_root / folder
    tmp = tiles_root / f".{folder}.unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    n_tiles = 0
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise MediError(f"{zip_path}: member {bad} is corrupt; delete the zip and download again")
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                if parts and parts[0] == folder:
                    parts = parts[1:]
                if not parts or info.is_dir() or parts[0] in ("__MACOSX",):
                    continue
                if any(p in ("..", "") for p in parts) or PurePosixPath(info.filename).is_absolute():
                    raise MediError(f"{zip_path}: member {info.filename!r} would leave the target folder")
                out = tmp.joinpath(*parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                n_tiles += out.suffix.lower() in (".jpg", ".jpeg")
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MediError(f"{zip_path}: not a valid zip ({exc}); delete it and download again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if n_tiles == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MediError(f"{zip_path}: no JPEG tiles inside; expected <level>/<slide_barcode>/<tile>.jpg")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return n_tiles


def fetch_classes(classes: list[str], folders: dict[str, str], data_dir: Path, url_pattern: str = FILE_URL,
                  checksums: dict[str, dict] | None = None, keep_zips: bool = False) -> dict[str, int]:
    """Download, verify and unpack each class; returns tiles per class."""
    unknown = [c for c in classes if c not in folders]
    if unknown:
        raise MediError(f"unknown class(es) {unknown}; known: {sorted(folders)}")
    checksums = record_checksums() if checksums is None else checksums
    downloads, tiles_root = data_dir / ".downloads", data_dir / "tcga-ut"
    counts, fetched = {}, {}
    for c in classes:
        if folders[c] in fetched:           # a folder of several projects (COAD and READ): fetched once
            counts[c] = fetched[folders[c]]
            continue
        name = f"{folders[c]}.zip"
        meta = checksums.get(name)
        if meta is None:
            raise MediError(f"{name} is not a file of the Zenodo record; the record lists {sorted(checksums)[:40]}")
        zip_path = downloads / name
        if not zip_path.exists():
            fetch(url_pattern.format(name=name), zip_path)
        verify(zip_path, meta["size"], meta["md5"])
        counts[c] = fetched[folders[c]] = unpack(zip_path, tiles_root, folders[c])
        log.info("%s: %d tiles in %s", c, counts[c], tiles_root / folders[c])
        if not keep_zips:
            zip_path.unlink()
    return counts
