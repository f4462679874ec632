"""``dcp-hf verify``: read a whole checkpoint and check every file against what was recorded
for it: the block digests a dcp-hf save put in the index (:mod:`dcp_hf.format.digests`), and,
for a Hugging Face Hub download, the file's sha256 (a hub cache snapshot links each file to a
blob named by its sha256; ``hf download --local-dir`` records it in
``.cache/huggingface/download/NAME.metadata``)."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dcp_hf import training_state
from dcp_hf.errors import CheckpointFormatError, CheckpointNotFoundError
from dcp_hf.format import INDEX_NAME
from dcp_hf.format.digests import BLOCK, FileDigest, keys_in
from dcp_hf.format.header import read_header
from dcp_hf.format.index import decode_index_record
from dcp_hf.inspect import printable
from dcp_hf.storage.stores import open_store

OK, MISMATCH, NO_DIGEST = "OK", "MISMATCH", "no digest recorded"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class FileReport:
    """What ``verify`` found for one file: ``status`` OK, MISMATCH or no digest recorded;
    ``checked``: what was compared; ``problems``: each mismatch, described."""

    name: str
    status: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = f" ({', '.join(self.checked)})" if self.checked else ""
        lines = [f"{printable(self.name)}: {self.status}{what}"]
        return "\n".join(lines + [f"  {p}" for p in self.problems])


def hub_sha256s(folder: str) -> dict[str, str]:
    """The sha256 the Hugging Face Hub recorded for the folder's files: a snapshot folder of the
    hub cache links each file to ``blobs/<sha256>`` (LFS files; small files are named by their
    git sha1, 40 digits, and not checked); a ``--local-dir`` download keeps the ETag (the
    sha256 of LFS files) in ``.cache/huggingface/download/NAME.metadata``."""
    found = {}
    if "://" in folder or not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            target = os.readlink(path)
            blob = os.path.basename(target)
            if os.path.basename(os.path.dirname(target)) == "blobs" and _SHA256.match(blob):
                found[name] = blob
    meta = os.path.join(folder, ".cache", "huggingface", "download")
    if os.path.isdir(meta):
        for entry in sorted(os.listdir(meta)):
            if entry.endswith(".metadata") and "/" not in entry:
                with open(os.path.join(meta, entry), encoding="utf-8", errors="replace") as f:
                    lines = f.read().splitlines()
                if len(lines) >= 2 and _SHA256.match(lines[1].strip()):
                    found.setdefault(entry[: -len(".metadata")], lines[1].strip())
    return found


def verify_checkpoint(path: str, storage_options: dict | None = None, threads: int = 4) -> list[FileReport]:
    """Every file of the checkpoint at ``path`` (folder or URL) checked, read once, in blocks."""
    store = open_store(path, storage_options)
    names: list[str] = []
    digests: dict[str, FileDigest] = {}
    for index in (INDEX_NAME, training_state.INDEX_NAME):
        if store.exists(index):
            record = decode_index_record(store.read(index), store.where(index))
            weight_map, recorded = record.weight_map, record.digests
            names += sorted(set(weight_map.values()) - set(names))
            digests.update(recorded)
    hub = hub_sha256s(path)
    if not names:
        if not store.is_folder():
            raise CheckpointNotFoundError(f"{path}: no such checkpoint folder")
        names = [n for n in store.list() if n.endswith(".safetensors") and not n.startswith(".")]
        if not names:
            raise CheckpointNotFoundError(f"{path}: no {INDEX_NAME} and no .safetensors file; not an HF checkpoint")
    names += [n for n in hub if n not in names]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(pool.map(lambda n: _verify_file(store, n, digests.get(n), hub.get(n)), names))


def _verify_file(store, name: str, digest: FileDigest | None, sha256: str | None) -> FileReport:
    where = store.where(name)
    try:
        handle = store.open(name)
    except CheckpointFormatError as e:
        return FileReport(name, MISMATCH, problems=[str(e)])
    try:
        size = store.size(handle)
        block = digest.block if digest else BLOCK
        hasher = hashlib.sha256() if sha256 else None
        bad: list[tuple[int, int, int]] = []  # (block, bytes, digest read)
        first = b""
        for b in range(-(-size // block) if size else 0):
            data = store.read_range(handle, b * block, min(block, size - b * block))
            if b == 0:
                first = data
            if hasher is not None:
                hasher.update(data)
            got = digest.mismatch(b, data) if digest else None
            if got is not None:
                bad.append((b, len(data), got))
    finally:
        store.close(handle)
    report = FileReport(name, OK)
    if digest is not None:
        report.checked.append(f"{digest.algo}, {len(digest.digests)} blocks of {digest.block} bytes")
        if len(digest.digests) != -(-size // digest.block):
            report.problems.append(
                f"{size} bytes, but the save recorded {len(digest.digests)} blocks of {digest.block}: "
                f"the file was cut short or extended after it was written"
            )
        header = _header_or_none(first, where, size) if bad else None
        for b, n, got in bad:
            lo = b * digest.block
            keys = keys_in(header, lo, lo + n) if header is not None else []
            report.problems.append(digest.mismatch_message(where, b, n, got, keys))
    if sha256 is not None:
        report.checked.append("sha256 recorded by the Hugging Face Hub")
        if hasher.hexdigest() != sha256:
            report.problems.append(
                f"{where}: sha256 {hasher.hexdigest()}, but the Hugging Face Hub recorded {sha256}: "
                f"the file is not the one downloaded"
            )
    if report.problems:
        report.status = MISMATCH
    elif digest is None and sha256 is None:
        report.status = NO_DIGEST
    return report


def _header_or_none(first: bytes, where: str, size: int):
    """The file's header from its first block, to name the keys of a bad block (None when the
    header itself is what changed)."""
    try:
        return read_header(lambda off, n: first[off : off + n], where, size)
    except CheckpointFormatError:
        return None
