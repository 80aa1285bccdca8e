"""Checkpoints you can trust: a manifest per checkpoint, ``latest`` only ever names a complete one.

A checkpoint is a DeepSpeed checkpoint folder ``<ckpt_dir>/<tag>`` (tag ``step<N>``) plus
``manifest.json``: the size and sha256 of every file in it, and what the trainer needs to resume
(step, consumed batches, world size, ZeRO stage, dtype). The trainer writes the manifest, then
``latest``, only after every rank has finished writing its files; both are replaced atomically.
A checkpoint without a manifest is a save that never completed.

On resume the chosen checkpoint is verified against its manifest. If ``latest`` names a bad one,
the newest good checkpoint is used instead, with a warning naming what was skipped and why
(nothing is lost beyond the interrupted or damaged save); ``--run-resume-from TAG`` picks one and
fails if it is bad.

Imports neither torch nor deepspeed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step{step}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def write_manifest(ckpt_dir: Path, tag: str, meta: dict) -> dict:
    """List every file of checkpoint ``tag`` with its size and sha256 in its manifest, with ``meta``."""
    folder = Path(ckpt_dir) / tag
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    if not files:
        raise CheckpointError(f"checkpoint {folder} holds no files")
    manifest = {**meta, "tag": tag, "files": files}
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def commit(ckpt_dir: Path, tag: str, meta: dict, *, keep_last: int = 0) -> dict:
    """After every rank has written ``tag``: write its manifest, then point ``latest`` at it, then
    delete all but the ``keep_last`` newest committed checkpoints (0: keep all). Rank 0 only."""
    manifest = write_manifest(ckpt_dir, tag, meta)
    _atomic_write(Path(ckpt_dir) / LATEST, tag)
    if keep_last:
        committed = [t for t in tags(ckpt_dir) if (Path(ckpt_dir) / t / MANIFEST).is_file()]
        for old in committed[:-keep_last]:
            remove(ckpt_dir, old)
    return manifest


def remove(ckpt_dir: Path, tag: str) -> None:
    """Delete checkpoint ``tag`` and what was derived from it (its universal conversions)."""
    for path in Path(ckpt_dir).glob(f"{tag}*"):
        if path.is_dir() and (path.name == tag or path.name.startswith(f"{tag}_universal")):
            shutil.rmtree(path, ignore_errors=True)


def tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags in ``ckpt_dir``, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and step_of(p.name) is not None), key=step_of)


def verify(ckpt_dir: Path, tag: str) -> dict:
    """The manifest of ``tag`` if every file it lists is there with its size and checksum; else
    CheckpointError saying what is wrong."""
    folder = Path(ckpt_dir) / tag
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {MANIFEST}: its save never completed") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / MANIFEST} is corrupt ({err})") from None
    for name, want in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{path} has {size} bytes, its manifest says {want['size']}")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path} does not match its manifest's sha256")
    return manifest


def choose(ckpt_dir: Path, *, resume_from: str | None = None) -> dict | None:
    """The manifest of the checkpoint to resume from, or None to start fresh.

    ``resume_from``: that tag, verified (CheckpointError if it is bad). Otherwise the one
    ``latest`` names; if it is bad, the newest good one, with a warning naming what was skipped.
    CheckpointError if ``latest`` exists but no checkpoint is good.
    """
    ckpt_dir = Path(ckpt_dir)
    if resume_from:
        try:
            return verify(ckpt_dir, resume_from)
        except CheckpointError as err:
            raise CheckpointError(f"--run-resume-from {resume_from}: {err}") from None
    latest_file = ckpt_dir / LATEST
    if not latest_file.is_file():
        return None
    latest = latest_file.read_text().strip()
    skipped = []
    candidates = [latest] + [t for t in reversed(tags(ckpt_dir)) if t != latest]
    for tag in candidates:
        try:
            manifest = verify(ckpt_dir, tag)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        if skipped:
            warnings.warn(f"resuming from {tag}, skipping: " + "; ".join(skipped), RuntimeWarning, stacklevel=2)
        return manifest
    raise CheckpointError(f"{latest_file} names {latest}, but no checkpoint in {ckpt_dir} is intact: "
                          + "; ".join(skipped) + ". Move the folder away to start over")
