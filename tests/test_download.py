"""Downloading a checkpoint from a real HTTP server on 127.0.0.1: whole, cut off and resumed,
checksum mismatch, HTTP errors; never a half file under the final name."""

import hashlib
import re

import pytest

from magma_ipu import DownloadError
from magma_ipu.download import download_url, resolve_checkpoint

BLOB = bytes(range(256)) * 4096  # 1 MiB


def serve_with_ranges(server, path, body, cut_first_at=None):
    """A route honouring `Range: bytes=N-`; the first request is cut off after `cut_first_at` bytes."""
    state = {"calls": 0}

    def handler(h):
        state["calls"] += 1
        start = 0
        match = re.match(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            if start >= len(body):
                h.send_response(416)
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(body) - start))
        h.end_headers()
        payload = body[start:]
        if cut_first_at is not None and state["calls"] == 1:
            payload = payload[:cut_first_at]
        h.wfile.write(payload)
        h.wfile.flush()

    server.routes[path] = handler
    return state


def test_full_download_with_checksum(http_server, tmp_path):
    serve_with_ranges(http_server, "/w.pt", BLOB)
    dest = download_url(http_server.url("/w.pt"), tmp_path / "w.pt", sha256=hashlib.sha256(BLOB).hexdigest())
    assert dest.read_bytes() == BLOB and not (tmp_path / "w.pt.part").exists()


def test_cut_off_download_resumes_with_only_the_remainder(http_server, tmp_path):
    serve_with_ranges(http_server, "/w.pt", BLOB, cut_first_at=300_000)
    url = http_server.url("/w.pt")
    with pytest.raises(DownloadError, match="cut off at 300000 of 1048576 bytes; run again to resume"):
        download_url(url, tmp_path / "w.pt", timeout=5)
    assert not (tmp_path / "w.pt").exists()  # never a half file under the final name
    assert (tmp_path / "w.pt.part").stat().st_size == 300_000
    download_url(url, tmp_path / "w.pt", sha256=hashlib.sha256(BLOB).hexdigest(), timeout=5)
    assert (tmp_path / "w.pt").read_bytes() == BLOB
    ranges = [headers.get("Range") for path, headers in http_server.requests if path == "/w.pt"]
    assert ranges == [None, "bytes=300000-"]


def test_checksum_mismatch_removes_the_bad_file(http_server, tmp_path):
    serve_with_ranges(http_server, "/w.pt", BLOB)
    with pytest.raises(DownloadError, match="expected 0000"):
        download_url(http_server.url("/w.pt"), tmp_path / "w.pt", sha256="0" * 64)
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.pt.part").exists()


def test_http_errors_and_no_server(http_server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_url(http_server.url("/missing.pt"), tmp_path / "m.pt")
    port = http_server.server.server_address[1]
    http_server.close()
    with pytest.raises(DownloadError, match="could not connect"):
        download_url(f"http://127.0.0.1:{port}/w.pt", tmp_path / "m.pt", timeout=2)
    assert not list(tmp_path.iterdir())


def test_checkpoint_url_is_downloaded_once_into_the_cache(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cache"))
    state = serve_with_ranges(http_server, "/ckpt/model.pt", BLOB)
    first = resolve_checkpoint(http_server.url("/ckpt/model.pt"))
    second = resolve_checkpoint(http_server.url("/ckpt/model.pt"))
    assert first == second and first.name == "model.pt" and first.read_bytes() == BLOB
    assert state["calls"] == 1


def test_unknown_checkpoint_reference_is_explained():
    with pytest.raises(DownloadError, match="is not a file"):
        resolve_checkpoint("no_such_file.pt")
