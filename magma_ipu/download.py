"""Fetching bytes over HTTP(S) and files from the Hugging Face Hub, with clear failures."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import DownloadError

USER_AGENT = "magma-ipu/1.0"


def fetch_bytes(url: str, timeout: float, max_bytes: int, what: str = "file") -> bytes:
    """The body of `url`, refused as soon as it grows past `max_bytes` (checked while streaming)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise DownloadError(f"{what} at {url} is {int(declared)} bytes, over the limit of {max_bytes} bytes")
            chunks, size = [], 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadError(f"{what} at {url} is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{what} at {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise DownloadError(f"{what} at {url}: no answer within {timeout} s (timeout)") from None
        raise DownloadError(f"{what} at {url} could not be reached: {reason}") from None
    except TimeoutError:
        raise DownloadError(f"{what} at {url}: no answer within {timeout} s (timeout)") from None
    except (OSError, ValueError) as e:
        raise DownloadError(f"{what} at {url} could not be fetched: {e}") from None


def download_url(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    timeout: float = 30.0,
    progress: bool = False,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download `url` to `dest`, resuming a previous partial download (HTTP Range).

    Bytes go to `dest.part`; only a complete file (length as announced, sha256 as given) is
    renamed to `dest`, atomically. A cut-off download keeps its `.part` for the next call to
    resume; a checksum mismatch removes it.
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or _sha256(dest) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part is already whole
            return _finish(part, dest, sha256, expected=have)
        raise DownloadError(f"download of {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise DownloadError(f"download of {url}: could not connect ({getattr(e, 'reason', e)}); "
                            "check the network or give a local path") from None
    with response:
        if response.status == 206:
            mode, start = "ab", have
        else:  # the server ignored the range: start over
            mode, start = "wb", 0
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length is not None and length.isdigit() else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=expected, initial=start, unit="B", unit_scale=True, desc=dest.name)
        written = start
        try:
            with open(part, mode) as f:
                while chunk := response.read(chunk_size):
                    f.write(chunk)
                    written += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        except OSError as e:
            if isinstance(e, (TimeoutError, ConnectionError)) or "timed out" in str(e):
                raise DownloadError(f"download of {url} cut off at {written} bytes: {e}; "
                                    f"run again to resume from {part}") from None
            raise DownloadError(f"download of {url}: could not write {part} ({e.strerror or e}); "
                                f"free some disk space and run again to resume") from None
        except Exception as e:  # http.client.IncompleteRead and friends: the connection broke
            raise DownloadError(f"download of {url} cut off at {written} bytes ({type(e).__name__}); "
                                f"run again to resume from {part}") from None
        finally:
            if bar is not None:
                bar.close()
    return _finish(part, dest, sha256, expected, url)


def _finish(part: Path, dest: Path, sha256: str | None, expected: int | None, url: str = "") -> Path:
    size = part.stat().st_size
    if expected is not None and size < expected:
        raise DownloadError(f"download of {url} cut off at {size} of {expected} bytes; "
                            f"run again to resume from {part}")
    if sha256 is not None:
        actual = _sha256(part)
        if actual != sha256.lower():
            part.unlink()
            raise DownloadError(f"download of {url or dest.name} has sha256 {actual}, expected {sha256.lower()}; "
                                "the corrupt file was removed")
    os.replace(part, dest)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("MAGMA_CACHE", Path.home() / ".cache" / "magma_ipu"))


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
        name = reference.rstrip("/").rsplit("/", 1)[-1] or "checkpoint.pt"
        key = hashlib.sha256(reference.encode()).hexdigest()[:16]
        return download_url(reference, cache_dir() / "downloads" / key / name, sha256=sha256, progress=progress)
    parts = reference.split("/")
    if len(parts) >= 3 and not reference.startswith(("/", ".", "~")):
        return hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    raise DownloadError(
        f"checkpoint {reference!r} is not a file; give a path, a URL, 'hub', or a hub reference 'owner/repo/file'"
    )
