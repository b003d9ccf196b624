"""PEP 517 build backend: setuptools, built against the torch of the environment being installed into.

A compiled torch extension only works with the torch it was compiled against, so `pip install .` must
build against the torch that will import it. pip's default isolated build would install a torch of its
own choosing (another version, maybe a CUDA build on a machine without a GPU), so this backend

- never asks for torch in ``get_requires_for_build_*``: the target environment must already have it,
  and when it has none the build stops within seconds with one line saying which command works;
- makes the target environment's torch importable in the isolated build (its folder goes to the end of
  ``sys.path`` and of ``PYTHONPATH``, so the isolated setuptools still wins);
- copies the compiler's progress (ninja's ``[k/N]`` lines) to the terminal, since pip shows the build's
  output only with ``-v`` or on failure.

Everything else is setuptools' ``build_meta`` (setup.py does the building).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time

from setuptools import build_meta as _setuptools

_TESTED_TORCH = "2.13.0"  # requirements.txt's pin: the command we suggest when torch is missing
_OLDEST_TORCH = (2, 11)


def _find_target_torch() -> tuple[str, str] | None:
    """(version, folder holding the torch package) of the environment pip installs into, or None.

    pip runs this backend with the target environment's interpreter (``sys.executable``) but hides its
    site-packages behind the isolated build environment; ``python -E`` (PYTHONPATH and friends
    ignored) sees that interpreter's own ``sys.path`` again. Without isolation torch is importable here.
    """
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:  # no isolation: it is already here
        return importlib.metadata.version("torch"), os.path.dirname(list(spec.submodule_search_locations)[0])
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os\n"
        "s = u.find_spec('torch')\n"
        "print(json.dumps(None if s is None or not s.submodule_search_locations else "
        "[m.version('torch'), os.path.dirname(list(s.submodule_search_locations)[0])]))\n"
    )
    try:
        # cwd: not the source tree, which `-c` would put first on sys.path
        out = subprocess.run(
            [sys.executable, "-E", "-c", probe], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(sys.executable),
        )
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError, OSError):
        return None
    return tuple(found) if found else None


def _require_target_torch() -> tuple[str, str]:
    found = _find_target_torch()
    if found is None:
        # One line: pip prints the hook's output under its own error banner.
        raise SystemExit(
            f"fdsm_ext compiles against the torch that will import it, and {sys.executable} has none: "
            f"install torch first, e.g. `pip install torch=={_TESTED_TORCH} && pip install .` "
            "(or a CUDA build of torch 2.11-2.14 for GPUs)"
        )
    release = tuple(int(p) for p in re.findall(r"\d+", found[0])[:2])
    if release < _OLDEST_TORCH:
        raise SystemExit(
            f"fdsm_ext needs torch >= {'.'.join(map(str, _OLDEST_TORCH))}, and {sys.executable} has torch "
            f"{found[0]}: `pip install torch=={_TESTED_TORCH} && pip install .`"
        )
    return found


def _expose_target_torch() -> str:
    """Put the target environment's torch on this process's (and its children's) import path."""
    version, folder = _require_target_torch()
    if folder not in sys.path:
        sys.path.append(folder)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), folder) if p)
    return version


class _CompileProgress:
    """Copies ninja's ``[k/N]`` compile steps from this process's stdout to the terminal.

    pip captures the build's stdout and shows it only with ``-v`` or on failure, so a two-minute
    compile looked like a hang. fd 1 goes through a pipe; every byte still reaches pip, and each
    compile step also prints one short line on /dev/tty (when there is one; never in CI).
    """

    _STEP = re.compile(r"^\[(\d+)/(\d+)\].*\s(\S+\.(?:cpp|cc|cu|c))(?:\s|$)")

    def __init__(self) -> None:
        try:
            self._tty = open("/dev/tty", "w")  # noqa: SIM115 - closed in __exit__
        except OSError:
            self._tty = None

    def say(self, text: str) -> None:
        if self._tty is not None:
            self._tty.write(f"\n  fdsm_ext: {text}")
            self._tty.flush()

    def __enter__(self) -> "_CompileProgress":
        if self._tty is None:
            return self
        sys.stdout.flush()
        self._saved = os.dup(1)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self._thread.start()
        return self

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                os.write(self._saved, raw)
                match = self._STEP.match(raw.decode(errors="replace"))
                if match:
                    done, total, source = match.groups()
                    self.say(f"[{done}/{total}] compiled {os.path.relpath(source)}")

    def __exit__(self, *exc) -> None:
        if self._tty is None:
            return
        sys.stdout.flush()
        os.dup2(self._saved, 1)  # closes the pipe's last write end: the pump sees EOF
        self._thread.join(timeout=10)
        os.close(self._saved)
        self._tty.write("\n")
        self._tty.close()


def _build(hook, *args, **kwargs):
    torch_version = _expose_target_torch()
    with _CompileProgress() as progress:
        progress.say(
            f"compiling the extension against torch {torch_version} (a few minutes; "
            "`pip install -v .` shows the compiler's output)"
        )
        start = time.monotonic()
        result = hook(*args, **kwargs)
        progress.say(f"built in {time.monotonic() - start:.0f} s")
    return result


def _requires(hook, config_settings=None):
    _expose_target_torch()  # setuptools runs setup.py to answer, and setup.py imports torch
    return [r for r in hook(config_settings) if not r.lower().startswith("torch")]


def get_requires_for_build_wheel(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(_setuptools.build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(_setuptools.build_editable, wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_sdist(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_sdist, config_settings)


def build_sdist(sdist_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.build_sdist(sdist_directory, config_settings)
