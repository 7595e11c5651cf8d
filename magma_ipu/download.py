"""Fetching bytes over HTTP(S) and files from the Hugging Face Hub, with clear failures."""

from __future__ import annotations

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
                raise DownloadError(f"{what} at {url} is {int(declared)} bytes, over the limit of {max_bytes}")
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


def resolve_checkpoint(reference: str) -> Path:
    """A local file for a checkpoint reference: a path, `hub`, or `owner/repo/file` on the hub."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    if reference == "hub":
        reference = DEFAULT_HUB_CHECKPOINT
    if reference.startswith(("http://", "https://")):
        raise DownloadError(f"checkpoint URL {reference!r}: download it first and give the local path")
    parts = reference.split("/")
    if len(parts) >= 3 and not reference.startswith(("/", ".", "~")):
        return hub_file("/".join(parts[:2]), "/".join(parts[2:]))
    raise DownloadError(
        f"checkpoint {reference!r} is not a file; give a path, 'hub', or a hub reference 'owner/repo/file'"
    )
