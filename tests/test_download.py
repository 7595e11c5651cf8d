"""Downloading a checkpoint from a real HTTP server on 127.0.0.1: whole, cut off and resumed,
checksum mismatch, HTTP errors, servers that answer ranges wrongly, cut bodies short, break the
protocol or drip; concurrent downloads; never a half file under the final name."""

import hashlib
import json
import re
import socket
import threading
import time

import pytest

from magma_ipu import ConfigError, DownloadError
from magma_ipu.config import load_config
from magma_ipu.download import download_url, fetch_bytes, resolve_checkpoint

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
                h.send_header("Content-Range", f"bytes */{len(body)}")
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
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt.lock"]  # kept: removing it would race a waiter


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


def ranges_of(server, path):
    return [headers.get("Range") for p, headers in server.requests if p == path]


def misanswering_range(body, content_range, status=206):
    """A route that answers a Range request with `status` and `content_range(start)` over body[lo:hi+1]
    (wrong on purpose), and a request without Range with the whole body."""

    def handler(h):
        match = re.match(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if not match:
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        lo, hi, header = content_range(int(match.group(1)))
        h.send_response(status)
        if header is not None:
            h.send_header("Content-Range", header)
        h.send_header("Content-Length", str(hi + 1 - lo))
        h.end_headers()
        h.wfile.write(body[lo:hi + 1])

    return handler


@pytest.mark.parametrize("status, content_range", [
    (206, lambda start: (0, len(BLOB) - 1, f"bytes 0-{len(BLOB) - 1}/{len(BLOB)}")),  # restarts at byte 0
    (206, lambda start: (start + 10, len(BLOB) - 1, f"bytes {start + 10}-{len(BLOB) - 1}/{len(BLOB)}")),
    (206, lambda start: (start, len(BLOB) - 1, None)),  # no Content-Range at all
    (200, lambda start: (0, len(BLOB) - 1, None)),  # the whole file: starts over
], ids=["restarts-at-0", "skips-10-bytes", "no-content-range", "200-whole-file"])
def test_a_range_answer_not_continuing_the_part_is_never_appended(http_server, tmp_path, status, content_range):
    http_server.routes["/w.pt"] = misanswering_range(BLOB, content_range, status)
    (tmp_path / "w.pt.part").write_bytes(BLOB[:300_000])
    download_url(http_server.url("/w.pt"), tmp_path / "w.pt", timeout=5)
    assert (tmp_path / "w.pt").read_bytes() == BLOB and not (tmp_path / "w.pt.part").exists()
    assert ranges_of(http_server, "/w.pt")[0] == "bytes=300000-"


def test_a_body_shorter_than_the_content_range_total_is_not_finished(http_server, tmp_path):
    # the server sends bytes 300000-399999 of 1048576 only: the file is not whole yet
    http_server.routes["/w.pt"] = misanswering_range(
        BLOB, lambda start: (start, start + 99_999, f"bytes {start}-{start + 99_999}/{len(BLOB)}"))
    (tmp_path / "w.pt.part").write_bytes(BLOB[:300_000])
    with pytest.raises(DownloadError, match="cut off at 400000 of 1048576 bytes; run again to resume"):
        download_url(http_server.url("/w.pt"), tmp_path / "w.pt", timeout=5)
    assert not (tmp_path / "w.pt").exists() and (tmp_path / "w.pt.part").read_bytes() == BLOB[:400_000]


@pytest.mark.parametrize("total", [len(BLOB), None])  # the size in Content-Range "bytes */N", or none
def test_416_on_a_stale_part_larger_than_the_file_starts_over(http_server, tmp_path, total):
    def handler(h):
        if h.headers.get("Range"):
            h.send_response(416)
            if total is not None:
                h.send_header("Content-Range", f"bytes */{total}")
            h.end_headers()
        else:
            h.send_response(200)
            h.send_header("Content-Length", str(len(BLOB)))
            h.end_headers()
            h.wfile.write(BLOB)

    http_server.routes["/w.pt"] = handler
    (tmp_path / "w.pt.part").write_bytes(b"x" * (len(BLOB) + 5000))  # from another version of the file
    download_url(http_server.url("/w.pt"), tmp_path / "w.pt", timeout=5)
    assert (tmp_path / "w.pt").read_bytes() == BLOB
    assert ranges_of(http_server, "/w.pt") == [f"bytes={len(BLOB) + 5000}-", None]


def test_416_on_a_whole_part_finishes_it(http_server, tmp_path):
    serve_with_ranges(http_server, "/w.pt", BLOB)
    (tmp_path / "w.pt.part").write_bytes(BLOB)
    download_url(http_server.url("/w.pt"), tmp_path / "w.pt", sha256=hashlib.sha256(BLOB).hexdigest(), timeout=5)
    assert (tmp_path / "w.pt").read_bytes() == BLOB and ranges_of(http_server, "/w.pt") == [f"bytes={len(BLOB)}-"]


def test_a_body_without_length_cut_short_is_never_finished(http_server, tmp_path):
    """HTTP/1.0 without Content-Length: the body ends when the connection closes, so a cut-off looks
    like the end. It stays a .part; the next run asks the server for the rest."""
    state = serve_with_ranges(http_server, "/w.pt", BLOB)
    ranged = http_server.routes["/w.pt"]

    def handler(h):
        if h.headers.get("Range"):
            return ranged(h)
        state["calls"] += 1
        h.send_response(200)  # the LocalServer speaks HTTP/1.0: no length, the connection closes
        h.end_headers()
        h.wfile.write(BLOB[:300_000])

    http_server.routes["/w.pt"] = handler
    url = http_server.url("/w.pt")
    with pytest.raises(DownloadError, match="announced no length, so a cut-off cannot be told from the end"):
        download_url(url, tmp_path / "w.pt", timeout=5)
    assert not (tmp_path / "w.pt").exists() and (tmp_path / "w.pt.part").stat().st_size == 300_000
    download_url(url, tmp_path / "w.pt", timeout=5)
    assert (tmp_path / "w.pt").read_bytes() == BLOB and ranges_of(http_server, "/w.pt") == [None, "bytes=300000-"]
    # with a sha256 the checksum decides: a cut body is refused and removed
    (tmp_path / "w.pt").unlink()
    with pytest.raises(DownloadError, match="has sha256"):
        download_url(url, tmp_path / "w.pt", sha256=hashlib.sha256(BLOB).hexdigest(), timeout=5)
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.pt.part").exists()


def test_fetch_bytes_refuses_a_body_shorter_than_announced(http_server):
    def handler(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"y" * 500)

    http_server.routes["/short"] = handler
    with pytest.raises(DownloadError, match="cut off at 500 of 1000 bytes"):
        fetch_bytes(http_server.url("/short"), timeout=5, max_bytes=10_000)


def test_an_existing_file_is_reused_only_as_recorded(http_server, tmp_path):
    state = serve_with_ranges(http_server, "/w.pt", BLOB)
    url, dest, meta = http_server.url("/w.pt"), tmp_path / "w.pt", tmp_path / "w.pt.meta"
    # truncated (a full disk, a copy cut short), no record: not returned, but resumed from where it ends
    dest.write_bytes(BLOB[:500_000])
    download_url(url, dest, timeout=5)
    assert dest.read_bytes() == BLOB and ranges_of(http_server, "/w.pt") == ["bytes=500000-"]
    assert json.loads(meta.read_text()) == {"size": len(BLOB), "sha256": None}
    download_url(url, dest, timeout=5)
    assert state["calls"] == 1  # reused: the size is as recorded
    # truncated under its record: resumed too
    dest.write_bytes(BLOB[:700_000])
    download_url(url, dest, timeout=5)
    assert dest.read_bytes() == BLOB and ranges_of(http_server, "/w.pt")[-1] == "bytes=700000-"
    # without a record and without a sha256, one request confirms the size (416, nothing left)
    meta.unlink()
    download_url(url, dest, timeout=5)
    assert dest.read_bytes() == BLOB and ranges_of(http_server, "/w.pt")[-1] == f"bytes={len(BLOB)}-"
    assert json.loads(meta.read_text())["size"] == len(BLOB)
    # without a record, a matching sha256 is enough, offline; a different one means another file
    meta.unlink()
    calls, digest = len(http_server.requests), hashlib.sha256(BLOB).hexdigest()
    download_url(url, dest, sha256=digest, timeout=5)
    assert len(http_server.requests) == calls and json.loads(meta.read_text())["sha256"] == digest
    with pytest.raises(DownloadError, match="has sha256"):
        download_url(url, dest, sha256="ab" * 32, timeout=5)
    assert not dest.exists() and not meta.exists()


def raw(data: bytes):
    """A route that writes `data` as the whole answer, status line included (or nothing)."""

    def handler(h):
        h.wfile.write(data)
        h.wfile.flush()

    return handler


@pytest.mark.parametrize("path, data, pattern", [
    ("/garbage", b"HELLO\r\n\r\n", "not a valid HTTP answer .BadStatusLine"),
    ("/long", b"HTTP/1.0 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "not a valid HTTP answer .LineTooLong"),
    ("/silent", b"", "the connection broke off .RemoteDisconnected"),
    ("/chunks", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\nabc", "IncompleteRead"),
    ("/a b.pt", None, "not a valid URL .InvalidURL"),
], ids=["bad-status-line", "line-too-long", "remote-disconnected", "incomplete-read", "space-in-url"])
def test_protocol_and_socket_errors_are_download_errors(http_server, tmp_path, path, data, pattern):
    if data is not None:
        http_server.routes[path] = raw(data)
    assert_both_refuse(http_server.url(path), pattern, tmp_path)


def assert_both_refuse(url: str, pattern: str, folder) -> None:
    """fetch_bytes and download_url both raise one line naming `url`; no file is left."""
    for call in (lambda: fetch_bytes(url, timeout=5, max_bytes=1 << 20),
                 lambda: download_url(url, folder / "w.pt", timeout=5)):
        with pytest.raises(DownloadError, match=pattern) as info:
            call()
        assert url in str(info.value) and "\n" not in str(info.value)
    assert not (folder / "w.pt").exists()


@pytest.mark.parametrize("url, pattern", [
    ("http://127.0.0.1:99999/w.pt", "not a valid URL"),
    ("http://a..b/w.pt", "label empty or too long"),  # a host name that cannot be encoded
    ("ftp://127.0.0.1/w.pt", "only http:// and https://"),
    ("file:///etc/passwd", "only http:// and https://"),
], ids=["port-out-of-range", "unencodable-host", "ftp", "file"])
def test_bad_urls_are_download_errors(tmp_path, url, pattern):
    assert_both_refuse(url, pattern, tmp_path)


def test_download_follows_redirects_only_to_http(http_server, tmp_path):
    serve_with_ranges(http_server, "/w.pt", BLOB)
    http_server.routes["/moved"] = (302, {"Location": "/w.pt"}, b"")
    assert download_url(http_server.url("/moved"), tmp_path / "w.pt").read_bytes() == BLOB
    with socket.socket() as listener:  # where the ftp:// redirect points: nothing may connect
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        for target in (f"ftp://127.0.0.1:{listener.getsockname()[1]}/p.pt", "file:///etc/passwd"):
            http_server.routes["/away"] = (302, {"Location": target}, b"")
            with pytest.raises(DownloadError, match="only http:// and https:// are followed"):
                download_url(http_server.url("/away"), tmp_path / "p.pt", timeout=2)
            assert not (tmp_path / "p.pt").exists() and not (tmp_path / "p.pt.part").exists()
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def drip(length: int, every: float):
    """A route announcing `length` bytes and sending one every `every` seconds."""

    def handler(h):
        h.send_response(200)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        try:
            for _ in range(length):
                h.wfile.write(b"z")
                h.wfile.flush()
                time.sleep(every)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    return handler


def test_a_dripping_server_meets_the_deadline_of_fetch_bytes(http_server):
    http_server.routes["/drip"] = drip(200, 0.05)  # 10 s in all, each byte well within the timeout
    with pytest.raises(DownloadError, match=r"not complete within 0.5 s \(timeout\)"):
        fetch_bytes(http_server.url("/drip"), timeout=0.5, max_bytes=1000)


def test_a_dripping_server_is_a_stalled_download(http_server, tmp_path):
    http_server.routes["/drip"] = drip(200, 0.05)
    with pytest.raises(DownloadError, match="stalled at .* bytes in .* s, under 100 per 0.3 s; run again to resume"):
        download_url(http_server.url("/drip"), tmp_path / "w.pt", timeout=5, stall_bytes=100, stall_seconds=0.3)
    assert not (tmp_path / "w.pt").exists() and 0 < (tmp_path / "w.pt.part").stat().st_size < 200


def test_two_downloads_of_the_same_file_take_turns(http_server, tmp_path):
    state = {"calls": 0}

    def slow(h):
        state["calls"] += 1
        h.send_response(200)
        h.send_header("Content-Length", str(len(BLOB)))
        h.end_headers()
        for i in range(0, len(BLOB), 1 << 16):
            h.wfile.write(BLOB[i:i + (1 << 16)])
            time.sleep(0.02)

    http_server.routes["/w.pt"] = slow
    start, results = threading.Barrier(2), []

    def download():
        start.wait()
        try:
            results.append(download_url(http_server.url("/w.pt"), tmp_path / "w.pt", timeout=5))
        except (DownloadError, OSError) as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=download) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "w.pt"] * 2 and state["calls"] == 1
    assert (tmp_path / "w.pt").read_bytes() == BLOB


def test_a_malformed_sha256_is_refused_before_any_download(http_server, tmp_path):
    serve_with_ranges(http_server, "/w.pt", BLOB)
    for bad in ("abc", "g" * 64, hashlib.sha256(BLOB).hexdigest() + "0"):
        with pytest.raises(DownloadError, match="sha256 must be 64 hex digits"):
            download_url(http_server.url("/w.pt"), tmp_path / "w.pt", sha256=bad)
        with pytest.raises(ConfigError, match="checkpoint_sha256 must be 64 hex digits"):
            load_config("demo", checkpoint_sha256=bad)
    assert http_server.requests == []
    assert load_config("demo", checkpoint_sha256="AB" * 32).checkpoint_sha256 == "AB" * 32


@pytest.mark.parametrize("path, name", [("/d/..", "checkpoint.pt"), ("/", "checkpoint.pt"),
                                        ("/d/a%20b.pt?dl=1", "a_b.pt")], ids=["dot-dot", "slash", "quoted"])
def test_checkpoint_file_names_from_urls_are_safe(http_server, tmp_path, monkeypatch, path, name):
    monkeypatch.setenv("MAGMA_CACHE", str(tmp_path / "cache"))
    serve_with_ranges(http_server, path, BLOB)
    got = resolve_checkpoint(http_server.url(path))
    assert got.name == name and got.parent.parent == tmp_path / "cache" / "downloads" and got.read_bytes() == BLOB


def test_magma_cache_naming_a_file_is_explained(http_server, tmp_path, monkeypatch):
    serve_with_ranges(http_server, "/w.pt", BLOB)
    (tmp_path / "file").write_text("not a folder")
    for cache in (tmp_path / "file", tmp_path / "file" / "below"):
        monkeypatch.setenv("MAGMA_CACHE", str(cache))
        with pytest.raises(ConfigError, match="is a file; set MAGMA_CACHE to a folder"):
            resolve_checkpoint(http_server.url("/w.pt"))
    assert http_server.requests == []
