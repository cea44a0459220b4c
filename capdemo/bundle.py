"""Weight bundles: one self-describing, verifiable folder per served model set.

Layout (``weights/<name>/``)::

    bundle.json            format + version, components (config dicts), sha256 + size of every file
    encoder/...            e.g. open_clip_model.safetensors for a local CLIP
    maccap/..., tomcap/... method weights (safetensors), tokenizer files, datastore, gap stats

Loading verifies the manifest before anything is read: every listed file must
exist with the recorded sha256, nothing pickle-like may sit in the folder, and
the format version must be one this code understands. Writing goes to a
temporary sibling folder that replaces the target only once complete, so a
killed export never leaves a half-written bundle behind; what a killed writer
does leave beside it (its staging folder, or the previous bundle set aside in
the middle of the swap) is tidied, or put back, by the next writer or reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from capdemo.fileio import atomic_output, save_safetensors
from capdemo.weights import UnsafeWeightsError, WeightSource, check_not_pickle, resolve

BUNDLE_FORMAT = "capdemo-bundle"
IN_BUNDLE_PREFIX = "bundle:"  # a spec in a component config that names a path inside the bundle
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
_HASH_CHUNK = 1 << 20
_HASHED_KEYS = ("format", "format_version", "components", "files")  # the manifest fields that describe its files


class BundleError(ValueError):
    """A bundle that is missing, tampered with, unsafe or of an unknown format."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_relpath(relpath: str) -> str:
    parts = Path(relpath).parts
    if not parts or Path(relpath).is_absolute() or ".." in parts or relpath == MANIFEST:
        raise BundleError(f"bad file name in bundle: {relpath!r}")
    return Path(relpath).as_posix()


class BundleWriter:
    """Collect components and files, then ``finish()`` writes them atomically with a manifest."""

    def __init__(self, out_dir: str | Path, *, name: str, description: str = "", **info: Any):
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        recover_interrupted_write(self.out_dir)
        self._staging = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.{_STAGING}-{_writer_tag()}-",
                                              dir=self.out_dir.parent))
        _in_use.add(self._staging.resolve())
        self._components: dict[str, dict[str, Any]] = {}
        self._info = {"name": name, "description": description, **info}

    @classmethod
    def extending(cls, out_dir: str | Path, **info: Any) -> BundleWriter:
        """A writer that starts from the (verified) bundle already at ``out_dir``, or an empty one if none.

        Training commands use this so ``--out weights/NAME`` adds or replaces one method's
        component without dropping the others.
        """
        out_dir = Path(out_dir)
        recover_interrupted_write(out_dir)  # before looking: a killed writer may have set the bundle aside
        existing = Bundle.load(out_dir) if (out_dir / MANIFEST).is_file() else None
        base_info = {k: v for k, v in (existing.manifest if existing else {}).items() if k not in _HASHED_KEYS}
        base_info.setdefault("name", out_dir.name)
        writer = cls(out_dir, **{**base_info, **info})
        if existing is not None:
            for rel in existing.manifest.get("files", {}):
                shutil.copyfile(existing.path / rel, writer.path(rel))
            writer._components.update(existing.components)
        return writer

    def set_info(self, *, overwrite: bool = True, **info: Any) -> None:
        """Top-level manifest fields (description, world, training ...); ``overwrite=False`` keeps existing ones."""
        for key, value in info.items():
            if overwrite or not self._info.get(key):
                self._info[key] = value

    def remove(self, prefix: str) -> None:
        """Drop every staged file under ``prefix/`` (before re-adding a component's files)."""
        folder = self._staging / _check_relpath(prefix)
        if folder.is_dir():
            shutil.rmtree(folder)

    def path(self, relpath: str) -> Path:
        """Where ``relpath`` goes inside the staging folder (parents created): for writers that need a path."""
        target = self._staging / _check_relpath(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_component(self, name: str, config: dict[str, Any]) -> None:
        self._components[name] = json.loads(json.dumps(config))  # a plain-JSON copy, checked serialisable now

    def add_tensors(self, relpath: str, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> None:
        save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, self.path(relpath), metadata)

    def add_json(self, relpath: str, obj: Any) -> None:
        self.path(relpath).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")

    def add_file(self, relpath: str, source: str | Path | bytes) -> None:
        target = self.path(relpath)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            check_not_pickle(Path(source))
            shutil.copyfile(source, target)

    def add_directory(self, relpath: str, source_dir: str | Path) -> None:
        for file in sorted(Path(source_dir).rglob("*")):
            if file.is_file():
                self.add_file(f"{relpath}/{file.relative_to(source_dir).as_posix()}", file)

    def finish(self) -> Path:
        files = {}
        for file in sorted(p for p in self._staging.rglob("*") if p.is_file()):
            rel = file.relative_to(self._staging).as_posix()
            files[rel] = {"sha256": sha256_of(file), "bytes": file.stat().st_size}
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            **self._info,
            "components": self._components,
            "files": files,
        }
        (self._staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _replace_dir(self._staging, self.out_dir)
        _in_use.discard(self._staging.resolve())
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
        _in_use.discard(self._staging.resolve())


def update_info(bundle_dir: str | Path, **info: Any) -> None:
    """Set top-level manifest fields of the finished bundle at ``bundle_dir`` in place (what a build measures once
    the bundle exists: its domain, its timings). Those fields are not hashed, so its files still verify; the
    ones that are (components, files) are refused."""
    hashed = sorted(set(info) & set(_HASHED_KEYS))
    if hashed:
        raise BundleError(f"update_info cannot change {', '.join(hashed)}: they describe the bundle's files")
    path = Path(bundle_dir) / MANIFEST
    manifest = {**json.loads(path.read_text()), **info}
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


# What a writer leaves beside a bundle if it dies: .NAME.staging-HOST-PID-* and, mid-swap, .NAME.old-HOST-PID.
_STAGING, _ASIDE = "staging", "old"
_LEFTOVER = re.compile(rf"\.(?P<bundle>.+)\.(?P<kind>{_STAGING}|{_ASIDE})-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)(-.*)?")
_in_use: set[Path] = set()  # leftovers-to-be that this process made and may still be writing (resolved paths)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"


def _writer_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing folder with one rename each way."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.{_ASIDE}-{_writer_tag()}")
    _in_use.add(old.resolve())
    try:
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _in_use.discard(old.resolve())


def _writer_gone(path: Path, host: str, pid: int) -> bool:
    """Whether the writer that left ``path`` is certainly dead: on this host (POSIX), and its pid is not
    running, or is this process's own but ``path`` is not one it is using. Unsure means alive."""
    if os.name != "posix" or host != _host():
        return False
    if pid == os.getpid():
        return path.resolve() not in _in_use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's live process
        return False
    return False


def recover_interrupted_write(target: str | Path) -> None:
    """Tidy what writers that died mid-way left beside ``target``.

    A writer killed between :func:`_replace_dir`'s two renames leaves no
    ``target`` and the previous bundle set aside at ``.NAME.old-HOST-PID``: the
    newest such bundle is put back (should its writer still be alive, its second
    rename then fails loudly and nothing is lost). Staging folders and set-aside
    bundles are deleted only when their writer is certainly dead.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    leftovers = []  # (path, kind, writer gone)
    for sibling in target.parent.iterdir():
        match = _LEFTOVER.fullmatch(sibling.name)
        if match and match["bundle"] == target.name and sibling.is_dir():
            leftovers.append((sibling, match["kind"], _writer_gone(sibling, match["host"], int(match["pid"]))))
    aside = sorted((p for p, kind, _ in leftovers if kind == _ASIDE and (p / MANIFEST).is_file()),
                   key=lambda p: p.stat().st_mtime)
    if aside and not target.exists():
        try:
            os.replace(aside[-1], target)
        except OSError:  # another process put it back first
            pass
    for path, _, gone in leftovers:
        if gone and path.exists():
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Bundle:
    """A verified bundle folder; read its parts by relative path."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, spec: str | os.PathLike, *, verify: bool = True) -> Bundle:
        """Open a local bundle folder or ``hf-hub:org/repo@rev``, verifying it unless told not to."""
        source = WeightSource.parse(spec)
        path = resolve(spec, what="bundle", patterns=("*",)) if source.on_hub else Path(source.location)
        manifest_path = path / MANIFEST
        if not source.on_hub and not manifest_path.is_file():
            recover_interrupted_write(path)  # a writer killed mid-swap may have left it aside
        if not manifest_path.is_file():
            raise BundleError(f"{path}: not a capdemo bundle ({MANIFEST} missing)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = err.msg if hasattr(err, "msg") else err
            raise BundleError(f"{manifest_path}: unreadable manifest ({reason})") from None
        bundle = cls(path=path, manifest=manifest)
        bundle._check_format()
        if verify:
            bundle.verify()
        return bundle

    def _check_format(self) -> None:
        fmt, version = self.manifest.get("format"), self.manifest.get("format_version")
        if fmt != BUNDLE_FORMAT:
            raise BundleError(f"{self.path / MANIFEST}: format is {fmt!r}, expected {BUNDLE_FORMAT!r}")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{self.path / MANIFEST}: format_version {version!r} is not supported "
                f"(this capdemo reads {FORMAT_VERSION})"
            )

    def verify(self) -> None:
        """Every listed file present with its sha256; no pickle-like file anywhere in the folder."""
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            try:
                check_not_pickle(file)
            except UnsafeWeightsError as err:
                raise BundleError(str(err)) from None
        for rel, entry in self.manifest.get("files", {}).items():
            file = self.path / _check_relpath(rel)
            if not file.is_file():
                raise BundleError(f"{file}: listed in {MANIFEST} but missing")
            if file.stat().st_size != entry["bytes"]:
                raise BundleError(f"{file}: size {file.stat().st_size} != {entry['bytes']} in {MANIFEST} "
                                  "(truncated or changed)")
            if sha256_of(file) != entry["sha256"]:
                raise BundleError(f"{file}: sha256 mismatch with {MANIFEST} (file changed or corrupted)")

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("components", {})

    def has(self, component: str) -> bool:
        return component in self.components

    def component(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            have = ", ".join(sorted(self.components)) or "none"
            raise BundleError(f"{self.path}: bundle has no {name!r} component (it has: {have})")
        return self.components[name]

    def file(self, relpath: str) -> Path:
        rel = _check_relpath(relpath)
        if rel not in self.manifest.get("files", {}):
            raise BundleError(f"{self.path}: {rel} is not listed in {MANIFEST}")
        return self.path / rel

    def directory(self, relpath: str) -> Path:
        """A folder inside the bundle (e.g. a transformers ``save_pretrained`` folder) holding listed files."""
        rel = _check_relpath(relpath)
        if not any(name.startswith(rel + "/") for name in self.manifest.get("files", {})):
            raise BundleError(f"{self.path}: no files under {rel}/ in {MANIFEST}")
        return self.path / rel

    def locate(self, spec: str | None) -> str | None:
        """Turn a component's weight spec into one the loaders take: ``bundle:rel/path`` -> a local path here."""
        if spec is None or not spec.startswith(IN_BUNDLE_PREFIX):
            return spec
        rel = _check_relpath(spec[len(IN_BUNDLE_PREFIX):])
        return str(self.file(rel) if rel in self.manifest.get("files", {}) else self.directory(rel))

    def tensors(self, relpath: str, *, device: str = "cpu") -> dict[str, torch.Tensor]:
        return load_file(str(self.file(relpath)), device=device)

    def json(self, relpath: str) -> Any:
        return json.loads(self.file(relpath).read_text())
