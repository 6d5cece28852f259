"""`--download` against a local HTTP server on 127.0.0.1 serving tiny Flickr8k-layout zips.

Covers: full download + extraction + loading, resume of a `.part` file with an
HTTP Range request, a server that ignores Range, checksum mismatch, and the
offline error message.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_tf.config import DataConfig
from caption_tf.data import download
from caption_tf.data.datasets import load_dataset
from caption_tf.data.download import BASE_URL_ENV, DownloadError, download_file, ensure_flickr8k

NAMES = [f"{1000 + i}_abc.jpg" for i in range(4)]


def make_archives(folder: Path) -> dict[str, bytes]:
    """Flickr8k_Dataset.zip (Flicker8k_Dataset/*.jpg + __MACOSX debris) and Flickr8k_text.zip."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip", "w") as zf:
        for name in NAMES:
            img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
            path = folder / name
            img.save(path, format="JPEG")
            zf.write(path, f"Flicker8k_Dataset/{name}")
        zf.writestr("__MACOSX/Flicker8k_Dataset/._junk.jpg", b"resource fork")
    with zipfile.ZipFile(folder / "Flickr8k_text.zip", "w") as zf:
        token = "".join(f"{n}#{i}\ta picture number {j} caption {i}\n" for j, n in enumerate(NAMES) for i in range(5))
        zf.writestr("Flickr8k.token.txt", token)
        zf.writestr("Flickr8k.lemma.token.txt", token.replace("picture", "pictur"))
        zf.writestr("Flickr_8k.trainImages.txt", "\n".join(NAMES[:2]) + "\n")
        zf.writestr("Flickr_8k.devImages.txt", NAMES[2] + "\n")
        zf.writestr("Flickr_8k.testImages.txt", NAMES[3] + "\n")
    return {p.name: p.read_bytes() for p in folder.glob("*.zip")}


class ArchiveServer:
    """Serves `files` with HTTP Range support (optionally ignored); records every request."""

    def __init__(self, files: dict[str, bytes], honour_range: bool = True, break_first: bool = False):
        self.files, self.honour_range, self.requests = files, honour_range, []
        self.break_first = break_first  # first response announces all bytes, sends half, hangs up
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                rng = self.headers.get("Range")
                if rng and server.honour_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if server.break_first:
                    server.break_first = False
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/releases/Flickr8k/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_extracts_and_loads_flickr8k(tmp_path, monkeypatch):
    files = make_archives(tmp_path / "served")
    with ArchiveServer(files) as server:
        monkeypatch.setenv(BASE_URL_ENV, server.url)
        root = tmp_path / "flickr8k"
        ds = load_dataset(DataConfig(dataset="flickr8k", data_dir=str(root), download=True))
        assert sorted(server.requests) == [("Flickr8k_Dataset.zip", None), ("Flickr8k_text.zip", None)]
        assert [len(ds.split(s)) for s in ("train", "val", "test")] == [2, 1, 1]
        assert ds.by_id()["1000_abc"].captions[0] == "a picture number 0 caption 0"
        assert not (root / "__MACOSX").exists()
        for name, data in files.items():
            assert (root / "downloads" / name).read_bytes() == data
        # A second run finds the files and fetches nothing.
        load_dataset(DataConfig(dataset="flickr8k", data_dir=str(root), download=True))
        assert len(server.requests) == 2


def test_partial_download_is_resumed_with_range(tmp_path, monkeypatch):
    files = make_archives(tmp_path / "served")
    data = files["Flickr8k_Dataset.zip"]
    dest = tmp_path / "dl" / "Flickr8k_Dataset.zip"
    dest.parent.mkdir()
    half = len(data) // 2
    Path(str(dest) + ".part").write_bytes(data[:half])
    sha = hashlib.sha256(data).hexdigest()
    with ArchiveServer(files) as server:
        download_file(server.url + "Flickr8k_Dataset.zip", dest, sha256=sha)
    assert server.requests == [("Flickr8k_Dataset.zip", f"bytes={half}-")]
    assert dest.read_bytes() == data and not Path(str(dest) + ".part").exists()


def test_broken_transfer_keeps_part_and_next_run_resumes(tmp_path, monkeypatch):
    files = make_archives(tmp_path / "served")
    root = tmp_path / "flickr8k"
    with ArchiveServer(files, break_first=True) as server:
        monkeypatch.setenv(BASE_URL_ENV, server.url)
        cfg = DataConfig(dataset="flickr8k", data_dir=str(root), download=True)
        with pytest.raises(DownloadError, match="resumes"):
            load_dataset(cfg)
        part = root / "downloads" / "Flickr8k_Dataset.zip.part"
        kept = part.stat().st_size
        assert 0 < kept < len(files["Flickr8k_Dataset.zip"])
        ds = load_dataset(cfg)
    assert server.requests[:2] == [("Flickr8k_Dataset.zip", None), ("Flickr8k_Dataset.zip", f"bytes={kept}-")]
    assert (root / "downloads" / "Flickr8k_Dataset.zip").read_bytes() == files["Flickr8k_Dataset.zip"]
    assert len(ds.records) == len(NAMES)


def test_server_ignoring_range_restarts_the_file(tmp_path):
    files = make_archives(tmp_path / "served")
    data = files["Flickr8k_text.zip"]
    dest = tmp_path / "Flickr8k_text.zip"
    Path(str(dest) + ".part").write_bytes(b"stale bytes from another file")
    with ArchiveServer(files, honour_range=False) as server:
        download_file(server.url + "Flickr8k_text.zip", dest)
    assert server.requests[0][1] is not None  # it asked for a range, got 200
    assert dest.read_bytes() == data


def test_checksum_mismatch_deletes_part_and_names_url(tmp_path):
    files = make_archives(tmp_path / "served")
    dest = tmp_path / "Flickr8k_text.zip"
    with ArchiveServer(files) as server:
        with pytest.raises(DownloadError, match="Checksum mismatch for http://127.0.0.1"):
            download_file(server.url + "Flickr8k_text.zip", dest, sha256="0" * 64)
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_configured_checksums_are_enforced(tmp_path, monkeypatch):
    files = make_archives(tmp_path / "served")
    monkeypatch.setitem(download.FLICKR8K_ARCHIVES, "Flickr8k_text.zip", "f" * 64)
    with ArchiveServer(files) as server:
        monkeypatch.setenv(BASE_URL_ENV, server.url)
        with pytest.raises(DownloadError, match="Checksum mismatch"):
            ensure_flickr8k(DataConfig(dataset="flickr8k", data_dir=str(tmp_path / "f8k"), download=True))


def test_offline_error_names_url_and_expected_layout(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port on 127.0.0.1 with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(BASE_URL_ENV, f"http://127.0.0.1:{port}/files/")
    root = tmp_path / "flickr8k"
    with pytest.raises(DownloadError) as exc:
        load_dataset(DataConfig(dataset="flickr8k", data_dir=str(root), download=True))
    message = str(exc.value)
    assert f"http://127.0.0.1:{port}/files/Flickr8k_Dataset.zip" in message
    assert f"http://127.0.0.1:{port}/files/Flickr8k_text.zip" in message
    assert str(root) in message and "Flicker8k_Dataset/" in message and "Flickr8k.token.txt" in message


def test_missing_archive_on_server_is_a_clear_error(tmp_path, monkeypatch):
    with ArchiveServer({}) as server:
        monkeypatch.setenv(BASE_URL_ENV, server.url)
        with pytest.raises(DownloadError, match="HTTP 404"):
            ensure_flickr8k(DataConfig(dataset="flickr8k", data_dir=str(tmp_path / "f8k"), download=True))
