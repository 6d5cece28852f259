"""`--download`: fetch Flickr8k from its usual public archives, resumably, or say where to put it.

The two archives (`Flickr8k_Dataset.zip`, about 1 GB, and `Flickr8k_text.zip`)
are fetched from `FLICKR8K_BASE_URL` (override with the environment variable
`CAPTION_TF_FLICKR8K_URL`, e.g. a mirror or a local server) into
`DATA_DIR/downloads/`, with a progress bar. A broken transfer leaves a
`NAME.part` file that the next run continues with an HTTP Range request. A
known SHA-256 is checked before extraction; the zip's own CRCs are checked
while extracting. Offline, the error names the URL that failed and the folder
layout to create by hand.

Example:

```python
cfg = ensure_flickr8k(DataConfig(dataset="flickr8k", data_dir="data/flickr8k", download=True))
sorted(p.name for p in Path(cfg.data_dir).iterdir())[:2]
```
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from caption_tf.config import DataConfig
from caption_tf.data.layouts import flickr8k_present
from caption_tf.files import build_lock, file_sha256

FLICKR8K_BASE_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
BASE_URL_ENV = "CAPTION_TF_FLICKR8K_URL"
# Archive name -> SHA-256 hex digest, or None where no published checksum is known
# (the zip CRCs still catch corruption when extracting).
FLICKR8K_ARCHIVES: dict[str, Optional[str]] = {
    "Flickr8k_Dataset.zip": None,
    "Flickr8k_text.zip": None,
}
DOWNLOADS_SUBDIR = "downloads"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
# Zip entries that are packaging debris, never data.
JUNK_PREFIXES = ("__MACOSX/",)

FLICKR8K_MANUAL_LAYOUT = """Put the files there yourself instead:
  {root}/
    Flickr8k.token.txt            (from Flickr8k_text.zip; or Kaggle's captions.txt)
    Flickr_8k.trainImages.txt     (optional split files, from Flickr8k_text.zip)
    Flickr_8k.devImages.txt
    Flickr_8k.testImages.txt
    Flicker8k_Dataset/*.jpg       (from Flickr8k_Dataset.zip; or Images/*.jpg)
and run again with --data-dir {root} (without --download)."""


class DownloadError(RuntimeError):
    """A download that failed; the message names the URL and what to do instead."""


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "caption_tf"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def download_file(url: str, dest: str | Path, sha256: Optional[str] = None, timeout: float = TIMEOUT_S) -> Path:
    """Download `url` to `dest`, resuming `dest.part` with an HTTP Range request.

    Returns `dest`. A server that ignores Range (answers 200) restarts the file.
    Raises DownloadError naming the URL on network errors, short transfers and
    checksum mismatches (the bad `.part` is then deleted).

    Example:

    ```python
    download_file("https://example.org/a.zip", "downloads/a.zip")
    ```
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # Range not satisfiable: the .part is already whole
            return _finalise(part, dest, url, sha256)
        raise DownloadError(f"Download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"Download of {url} failed: {reason}") from None
    with response:
        resumed = offset > 0 and response.status == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        _stream(response, part, "ab" if resumed else "wb", offset, total, url)
    return _finalise(part, dest, url, sha256, total)


def _stream(response, part: Path, mode: str, offset: int, total: Optional[int], url: str) -> None:
    with open(part, mode) as out, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[: -len(".part")]
    ) as bar:
        try:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                out.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(
                f"Download of {url} broke off ({exc}); {part} is kept and the next run resumes it"
            ) from None


def _finalise(part: Path, dest: Path, url: str, sha256: Optional[str], total: Optional[int] = None) -> Path:
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(
            f"Download of {url} is incomplete ({size} of {total} bytes); {part} is kept and the next run resumes it"
        )
    if sha256:
        actual = file_sha256(part)
        if actual != sha256.lower():
            part.unlink()
            raise DownloadError(f"Checksum mismatch for {url}: SHA-256 {actual}, expected {sha256}; deleted {part}")
    os.replace(part, dest)
    return dest


def extract_zip(archive: str | Path, dest: str | Path) -> list[str]:
    """Extract `archive` into `dest`, skipping `__MACOSX/` debris; returns the names extracted.

    Refuses entries that would land outside `dest` (absolute paths, `..`).
    Raises DownloadError naming the archive when it is not a valid zip or a CRC fails.

    Example:

    ```python
    extract_zip("downloads/Flickr8k_text.zip", "data/flickr8k")[:1]
    ```
    """
    archive, dest = Path(archive), Path(dest)
    root = dest.resolve()
    names = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename.startswith(JUNK_PREFIXES) or info.is_dir():
                    continue
                target = (root / info.filename).resolve()
                if root not in target.parents:
                    raise DownloadError(f"{archive}: entry {info.filename!r} points outside {dest}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
                names.append(info.filename)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise DownloadError(f"{archive}: not a valid zip archive ({exc}); delete it and run again") from None
    return names


def flickr8k_base_url() -> str:
    """The archive base URL: `$CAPTION_TF_FLICKR8K_URL` if set, else `FLICKR8K_BASE_URL`."""
    return os.environ.get(BASE_URL_ENV) or FLICKR8K_BASE_URL


def ensure_flickr8k(cfg: DataConfig) -> DataConfig:
    """Make sure Flickr8k is on disk (downloading it if needed); return cfg with `data_dir` set.

    The target is `--data-dir`, or `DATA_ROOT/flickr8k`. Nothing is fetched when
    the files are already there. Each archive is extracted once (a `.done` marker).

    Example:

    ```python
    ensure_flickr8k(DataConfig(dataset="flickr8k", download=True)).data_dir
    ```
    """
    root = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.data_root) / "flickr8k"
    cfg = dataclasses.replace(cfg, data_dir=str(root))
    if flickr8k_present(root):
        return cfg
    with build_lock(root):  # several workers on one filesystem: one downloads, the others wait
        if not flickr8k_present(root):
            _download_flickr8k(root)
    return cfg


def _download_flickr8k(root: Path) -> None:
    base = flickr8k_base_url().rstrip("/") + "/"
    downloads = root / DOWNLOADS_SUBDIR
    for name, sha256 in FLICKR8K_ARCHIVES.items():
        url = base + name
        done = downloads / (name + ".done")
        if done.exists():
            continue
        print(f"Downloading {url} -> {downloads / name}", flush=True)
        try:
            archive = download_file(url, downloads / name, sha256)
        except DownloadError as exc:
            urls = "\n".join(f"  {base}{n}" for n in FLICKR8K_ARCHIVES)
            raise DownloadError(
                f"{exc}\nThe archives are:\n{urls}\n{FLICKR8K_MANUAL_LAYOUT.format(root=root)}"
            ) from None
        extract_zip(archive, root)
        done.touch()
    if not flickr8k_present(root):
        raise DownloadError(
            f"The archives from {base} did not contain the expected files.\n{FLICKR8K_MANUAL_LAYOUT.format(root=root)}"
        )
