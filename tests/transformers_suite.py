"""transformers' own common model tests, at the installed transformers version, as an outside judge.

Nothing of transformers' test code is kept in this repository: `load()` fetches it when the tests run.
Where from, in this order:
  1. `RWKV_HF_TRANSFORMERS_TESTS`: a `tests/` folder of a transformers checkout at the installed version
     (the full suite: it also has `generation/test_utils.py` with `GenerationTesterMixin`).
  2. transformers' source distribution from PyPI (`pip download --no-binary :all:`), cached under
     `RWKV_HF_CACHE` (default `~/.cache/rwkv-hf`). The sdist ships `tests/test_modeling_common.py` but
     not the `generation/` and `exporters/` packages it imports: `ModelTesterMixin` then runs, and the
     two mixins it only names (`GenerationTesterMixin`, `ExportTesterMixin`) are empty classes, so the
     `GenerationTesterMixin` tests do not run (`GENERATION_TESTS_SHIPPED` says which case it is).
A failure to get the sources is an error, never a skip: the judge must not vanish silently.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"  # the name its `tests/` folder is imported under (ours is `tests`)


def _cache_root() -> Path:
    return Path(os.environ.get("RWKV_HF_CACHE", Path.home() / ".cache" / "rwkv-hf")) / "transformers-tests"


def _from_sdist(version: str) -> Path:
    """The `tests/` folder of transformers' sdist at `version`, downloaded once and cached."""
    root = _cache_root() / version
    done = root / PACKAGE / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # pytest-xdist workers: one downloads, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _download_and_extract(version, root, done)
    return root


def _download_and_extract(version: str, root: Path, done: Path) -> None:
    archive = next(root.glob("transformers-*.tar.gz"), None)
    if archive is None:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"transformers=={version}", "-d", str(root)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = next(root.glob("transformers-*.tar.gz"), None)
        if archive is None:
            raise RuntimeError(f"could not download transformers=={version}'s sdist from PyPI:\n{proc.stderr[-2000:]}")
    target = root / PACKAGE
    prefix = f"{archive.name[: -len('.tar.gz')]}/tests/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        if not any(m.name == prefix + "test_modeling_common.py" for m in members):
            raise RuntimeError(f"{archive.name} has no tests/test_modeling_common.py")
        for m in members:
            out = target / m.name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
    done.touch()


def _link_checkout(tests_dir: Path, version: str) -> Path:
    root = _cache_root() / f"checkout-{version}"
    root.mkdir(parents=True, exist_ok=True)
    link = root / PACKAGE
    if link.is_symlink() and link.resolve() != tests_dir.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(tests_dir.resolve(), target_is_directory=True)
    return root


GENERATION_TESTS_SHIPPED = False


def load():
    """Import and return transformers' `test_modeling_common` module (see the module docstring)."""
    global GENERATION_TESTS_SHIPPED
    version = transformers.__version__
    given = os.environ.get("RWKV_HF_TRANSFORMERS_TESTS")
    if given:
        if not (Path(given) / "test_modeling_common.py").is_file():
            raise RuntimeError(f"RWKV_HF_TRANSFORMERS_TESTS={given} is not transformers' tests/ folder")
        root = _link_checkout(Path(given), version)
    else:
        root = _from_sdist(version)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    pkg = root / PACKAGE
    GENERATION_TESTS_SHIPPED = (pkg / "generation" / "test_utils.py").is_file()
    if not GENERATION_TESTS_SHIPPED:
        # the sdist leaves these packages out; test_modeling_common only imports a class from each
        import types

        for sub, cls in (("generation.test_utils", "GenerationTesterMixin"), ("exporters.test_export", "ExportTesterMixin")):
            name = f"{PACKAGE}.{sub}"
            if name not in sys.modules:
                parent = f"{PACKAGE}.{sub.split('.')[0]}"
                sys.modules.setdefault(parent, types.ModuleType(parent))
                mod = types.ModuleType(name)
                setattr(mod, cls, type(cls, (), {"__doc__": "not in transformers' sdist: no tests of its own"}))
                sys.modules[name] = mod
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
