"""Fetching bytes over HTTP(S) and files from the Hugging Face Hub, with clear failures."""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DownloadError

USER_AGENT = "magma-ipu/1.0"
# what a failing request raises: urllib's errors are OSErrors; http.client's (BadStatusLine, LineTooLong,
# IncompleteRead, InvalidURL) are not; a host name that cannot be encoded (also in a redirect) is a ValueError
_NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to http(s), checked before connecting: urllib alone also follows ftp://."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            fp.close()
            raise DownloadError(f"{req.full_url} redirects to {target}: only http:// and https:// are followed")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _Deadline:
    """Shuts down, once `seconds` have passed, every connection opened in this thread meanwhile: that
    wakes a read blocked on a server that drips bytes, which a per-read timeout never stops."""

    _current = threading.local()

    def __init__(self, seconds: float):
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)

    def __enter__(self) -> _Deadline:
        _Deadline._current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _Deadline._current.deadline = None

    def _expire(self) -> None:
        with self._lock:
            self.expired.set()
            for sock in self._sockets:
                _shut(sock)

    @classmethod
    def watch(cls, sock: socket.socket) -> None:
        deadline = getattr(cls._current, "deadline", None)
        if deadline is not None:
            with deadline._lock:
                deadline._sockets.append(sock)
                if deadline.expired.is_set():  # the deadline passed while it connected
                    _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:  # the plain TCP shutdown, also under TLS: the reading thread sees the end of the stream
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Watched:
    """An HTTP(S) connection that shows its socket to the deadline of its thread, if any."""

    def connect(self):
        super().connect()
        _Deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects, _HTTPHandler, _HTTPSHandler)


def _check_url(url: str, where: str) -> None:
    """A DownloadError, before any network use, for a URL that is not http(s) with a host and a valid port."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a ValueError for a port that is not a number in 0-65535
    except ValueError as e:
        raise DownloadError(f"{where}: not a valid URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"{where}: only http:// and https:// URLs with a host are fetched")


def _brief(reason: object) -> str:
    """An exception (or a reason text) on one line of at most 200 characters."""
    text = " ".join(str(reason).split())
    if isinstance(reason, BaseException):
        text = f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _why(e: BaseException, timeout: float) -> str:
    """What went wrong with a request, in a few words on one line (the caller names the URL)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):  # urllib's wrapper for failures before the request was sent
        if not isinstance(e.reason, TimeoutError):
            return f"could not be reached (could not connect: {_brief(e.reason)})"
        e = e.reason
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s (timeout)"
    if isinstance(e, http.client.InvalidURL):
        return f"not a valid URL ({_brief(e)})"
    if isinstance(e, (ConnectionError, http.client.IncompleteRead)):
        return f"the connection broke off ({_brief(e)})"
    if isinstance(e, http.client.HTTPException):
        return f"not a valid HTTP answer ({_brief(e)})"
    return _brief(e)


def fetch_bytes(url: str, timeout: float, max_bytes: int, what: str = "file") -> bytes:
    """The body of `url`, refused as soon as it grows past `max_bytes` (checked while streaming), if it
    is shorter than announced, or if it is not complete `timeout` seconds after the start: a deadline,
    as a server that drips bytes would reset a per-read timeout forever."""
    where = f"{what} at {url}"
    _check_url(url, where)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    late = f"{where}: not complete within {timeout:g} s (timeout)"
    with _Deadline(timeout) as deadline:
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                declared = response.headers.get("Content-Length")
                declared = int(declared) if declared is not None and declared.isdigit() else None
                if declared is not None and declared > max_bytes:
                    raise DownloadError(f"{where} is {declared} bytes, over the limit of {max_bytes} bytes")
                chunks, size = [], 0
                while chunk := response.read1(1 << 16):  # read1: returns what arrived, to check the deadline
                    size += len(chunk)
                    if size > max_bytes:
                        raise DownloadError(f"{where} is over the limit of {max_bytes} bytes")
                    chunks.append(chunk)
        except _NETWORK_ERRORS as e:
            raise DownloadError(late if deadline.expired.is_set() else f"{where}: {_why(e, timeout)}") from None
        if deadline.expired.is_set():  # the deadline ended the stream: what arrived may be a part
            raise DownloadError(late)
    if declared is not None and size < declared:
        raise DownloadError(f"{where} cut off at {size} of {declared} bytes")
    return b"".join(chunks)


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class _Job:
    url: str
    dest: Path
    sha256: str | None
    timeout: float
    progress: bool
    chunk_size: int
    stall_bytes: int
    stall_seconds: float

    def __post_init__(self):
        self.where = f"download of {self.url}"
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.meta = self.dest.with_name(self.dest.name + ".meta")


def download_url(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    timeout: float = 30.0,
    progress: bool = False,
    chunk_size: int = 1 << 20,
    stall_bytes: int = 1 << 16,
    stall_seconds: float = 60.0,
) -> Path:
    """Download `url` to `dest`, resuming a previous partial download (HTTP Range).

    Bytes go to `dest.part`; only a complete file (length as announced, sha256 as given) is
    renamed to `dest`, atomically, and then described in `dest.meta` (size, sha256), which later
    calls check before reusing `dest`. A cut-off download keeps its `.part` for the next call to
    resume; a checksum mismatch removes it. `timeout` bounds each wait for data; fewer than
    `stall_bytes` bytes in `stall_seconds` seconds also fail. Downloads of the same `dest` take
    turns (a lock on `dest.lock`): a second one waits, then finds the file.
    """
    job = _Job(url, Path(dest), sha256 and sha256.lower(), timeout, progress, chunk_size, stall_bytes, stall_seconds)
    _check_url(url, job.where)
    if job.sha256 is not None and not _SHA256.fullmatch(job.sha256):  # before fetching gigabytes to compare
        raise DownloadError(f"{job.where}: sha256 must be 64 hex digits, got {sha256!r}")
    try:
        job.dest.parent.mkdir(parents=True, exist_ok=True)
        with open(job.dest.with_name(job.dest.name + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    print(f"waiting for another download of {job.dest} to finish", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if job.dest.is_file() and _reuse(job):
                return job.dest
            return _fetch(job)
    except OSError as e:  # network failures are DownloadErrors by now: this is the file system
        raise DownloadError(f"{job.where}: could not write {e.filename or job.dest.parent} ({e.strerror or e}); "
                            "free some disk space or choose another folder, then run again to resume") from None


def _reuse(job: _Job) -> bool:
    """Whether the file under the final name is the one wanted: its record (written after a verified
    download) must give its size, and the sha256 asked for if any; a file without a record passes by
    its sha256. One that fails becomes the `.part` to resume (checked against the server's size,
    which for a whole file costs one request) or, if it failed a sha256, is removed."""
    try:
        record = json.loads(job.meta.read_text())
    except (OSError, ValueError):
        record = {}
    size = job.dest.stat().st_size
    if isinstance(record, dict) and record.get("size") == size and job.sha256 in (None, record.get("sha256")):
        return True
    if job.sha256 is not None and _sha256(job.dest) == job.sha256:
        _write_record(job, size)
        return True
    job.meta.unlink(missing_ok=True)
    if job.sha256 is None:
        os.replace(job.dest, job.part)
    else:
        job.dest.unlink()
    return False


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(first byte, last byte, total size) of a Content-Range header ("bytes 0-99/1000", "bytes */1000"),
    None for each that is "*", missing or malformed."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None, None
    start, end, total = (int(g) if g and g != "*" else None for g in match.groups())
    return start, end, total


def _fetch(job: _Job) -> Path:
    while True:  # at most twice: a restart drops the .part, so there is no Range left to disagree with
        have = job.part.stat().st_size if job.part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = _OPENER.open(urllib.request.Request(job.url, headers=headers), timeout=job.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left after `have` bytes: whole if the server's size agrees
                if _content_range(e.headers.get("Content-Range"))[2] == have:
                    return _finish(job, have)
                job.part.unlink()  # larger than the file, or a size not given: a stale part
                continue
            raise DownloadError(f"{job.where}: HTTP {e.code} {e.reason}") from None
        except _NETWORK_ERRORS as e:
            raise DownloadError(f"{job.where}: {_why(e, job.timeout)}") from None
        with response:
            if response.status == 206:
                value = response.headers.get("Content-Range")
                start, end, total = _content_range(value)
                if start != have or end is None or end < start or (total is not None and end >= total):
                    if not have:
                        raise DownloadError(f"{job.where}: answered a request for the whole file with "
                                            f"part of it (Content-Range {value!r})")
                    job.part.unlink()  # not the continuation asked for: never appended
                    continue
                announced, total = end - start + 1, end + 1 if total is None else total
            else:  # the whole file, also in reply to a Range request: start over
                length = response.headers.get("Content-Length")
                announced = total = int(length) if length is not None and length.isdigit() else None
                have = 0
            _receive(job, response, have, announced, total)
            if total is None and not response.chunked and job.sha256 is None:
                # a body that ends when the connection closes: a cut-off looks just the same
                raise DownloadError(
                    f"{job.where}: the server announced no length, so a cut-off cannot be told from the "
                    f"end; run again to check the size with the server and resume from {job.part}, "
                    "or give its sha256")
        return _finish(job, total)


def _receive(job: _Job, response, have: int, announced: int | None, total: int | None) -> None:
    """Writes the body to the part: after its first `have` bytes, at most `announced` bytes."""
    bar = None
    if job.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=job.dest.name)
    received, window_start, window_received = 0, time.monotonic(), 0
    try:
        with open(job.part, "ab" if have else "wb") as f:
            while announced is None or received < announced:
                want = job.chunk_size if announced is None else min(job.chunk_size, announced - received)
                try:
                    chunk = response.read1(want)  # what has arrived: a trickle is seen below
                except _NETWORK_ERRORS as e:
                    raise DownloadError(f"{job.where} cut off at {have + received} bytes "
                                        f"({_why(e, job.timeout)}); run again to resume from {job.part}") from None
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                now = time.monotonic()
                if now - window_start >= job.stall_seconds:
                    if received - window_received < job.stall_bytes:
                        raise DownloadError(
                            f"{job.where} stalled at {have + received} bytes: {received - window_received} bytes "
                            f"in {now - window_start:.1f} s, under {job.stall_bytes} per {job.stall_seconds:g} s; "
                            f"run again to resume from {job.part}")
                    window_start, window_received = now, received
    finally:
        if bar is not None:
            bar.close()


def _finish(job: _Job, total: int | None) -> Path:
    size = job.part.stat().st_size
    if total is not None and size < total:
        raise DownloadError(f"{job.where} cut off at {size} of {total} bytes; run again to resume from {job.part}")
    if job.sha256 is not None:
        actual = _sha256(job.part)
        if actual != job.sha256:
            job.part.unlink()
            raise DownloadError(f"{job.where} has sha256 {actual}, expected {job.sha256}; "
                                "the corrupt file was removed")
    job.meta.unlink(missing_ok=True)
    os.replace(job.part, job.dest)
    _write_record(job, size)
    return job.dest


def _write_record(job: _Job, size: int) -> None:
    """Describes the verified file under the final name, atomically: a torn record never matches."""
    tmp = job.meta.with_name(job.meta.name + ".tmp")
    tmp.write_text(json.dumps({"size": size, "sha256": job.sha256}))
    os.replace(tmp, job.meta)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """$MAGMA_CACHE, or ~/.cache/magma_ipu; a ConfigError if it, or the first of its parents that
    exists, is not a folder (it is made when first written)."""
    path = Path(os.environ.get("MAGMA_CACHE", Path.home() / ".cache" / "magma_ipu"))
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"the cache folder {str(path)!r} cannot be made: {str(folder)!r} is a file; "
                                  "set MAGMA_CACHE to a folder")
            break
    return path


def hub_file(repo_id: str, filename: str) -> Path:
    """A file from the Hugging Face Hub, through its own cache (resumes, progress bar)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # the hub client raises many types; all mean "not available"
        raise DownloadError(
            f"could not get {filename!r} from the Hugging Face Hub repository {repo_id!r}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(offline? give a local path instead)"
        ) from None


def _file_name(url: str) -> str:
    """A safe file name from the last segment of the URL's path (its extension tells the checkpoint's
    format): only letters, digits, ".", "_" and "-", at most 100 characters; "checkpoint.pt" when the
    segment is empty or only dots (a URL ending in "/" or "/..")."""
    segment = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    name = re.sub(r"[^A-Za-z0-9._-]", "_", segment)[-100:]
    return name if name.strip(".") else "checkpoint.pt"


DEFAULT_HUB_CHECKPOINT = "Aleph-Alpha/magma-research/magma_demo.pt"


def resolve_checkpoint(reference: str, sha256: str | None = None, progress: bool = False) -> Path:
    """A local file for a checkpoint reference: a path, an http(s) URL (downloaded once into the
    cache, resumable), `hub`, or `owner/repo/file` on the Hugging Face Hub."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    if reference == "hub":
        reference = DEFAULT_HUB_CHECKPOINT
    if reference.startswith(("http://", "https://")):
        _check_url(reference, f"checkpoint {reference}")
        name = _file_name(reference)
        key = hashlib.sha256(reference.encode()).hexdigest()[:16]
        return download_url(reference, cache_dir() / "downloads" / key / name, sha256=sha256, progress=progress)
    parts = reference.split("/")
    if len(parts) >= 3 and not reference.startswith(("/", ".", "~")):
        return hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    raise DownloadError(
        f"checkpoint {reference!r} is not a file; give a path, a URL, 'hub', or a hub reference 'owner/repo/file'"
    )
