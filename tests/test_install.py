"""The build backend (_build/backend.py) and the import-time check of the torch the extension was built for.

The full `pip install .` in a fresh virtual environment is checked by .ci/run (minutes); these are the
parts that can be checked in a second.
"""

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fdsm_ext._ext as ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def backend():
    spec = importlib.util.spec_from_file_location("fdsm_ext_build_backend", ROOT / "_build" / "backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hide_torch(monkeypatch, backend):
    """What pip's isolated build environment looks like to the backend: torch not importable."""
    real = importlib.util.find_spec
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))


def test_backend_finds_the_target_environments_torch_behind_isolation(backend, monkeypatch):
    _hide_torch(monkeypatch, backend)
    version, folder = backend._find_target_torch()
    assert version == torch.__version__
    assert Path(folder, "torch").resolve() == Path(torch.__file__).parent.resolve()


def test_backend_without_torch_stops_with_one_line_naming_the_command(backend, monkeypatch, tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    monkeypatch.setattr(backend.sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    _hide_torch(monkeypatch, backend)
    with pytest.raises(SystemExit) as info:
        backend.get_requires_for_build_wheel()
    message = str(info.value.code)
    assert "\n" not in message
    assert "pip install torch==" in message and "pip install ." in message


def test_backend_refuses_a_torch_older_than_supported(backend, monkeypatch):
    monkeypatch.setattr(backend, "_find_target_torch", lambda: ("2.4.1+cu121", "/somewhere"))
    with pytest.raises(SystemExit, match=r"needs torch >= 2\.11.*2\.4\.1\+cu121.*pip install torch=="):
        backend.get_requires_for_build_wheel()


def test_backend_never_asks_for_torch(backend):
    # torch is importable here (no isolation): the answer is setuptools' own, without torch.
    assert not any(r.lower().startswith("torch") for r in backend.get_requires_for_build_wheel())


def test_compile_progress_reads_ninja_lines(backend):
    line = "[3/5] c++ -MMD -MF a.o.d -O3 -c -c /src/csrc/cpu/fd_ops_cpu.cpp -o /b/fd_ops_cpu.o -std=c++17"
    assert backend._CompileProgress._STEP.match(line).groups() == ("3", "5", "/src/csrc/cpu/fd_ops_cpu.cpp")
    nvcc = "[7/9] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c /src/csrc/cuda/k.cu -o k.o -O3"
    assert backend._CompileProgress._STEP.match(nvcc).group(3) == "/src/csrc/cuda/k.cu"


def test_extension_built_for_another_torch_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "fdsm_ext._build_info", types.SimpleNamespace(TORCH_VERSION="2.11.0+cu130"))
    with pytest.raises(ImportError) as info:
        ext.check_build_matches_torch()
    message = str(info.value)
    assert "\n" not in message
    assert "2.11.0+cu130" in message and torch.__version__ in message and "pip install ." in message


def test_local_version_tag_does_not_count_as_another_torch(monkeypatch):
    public = torch.__version__.split("+")[0]
    monkeypatch.setitem(sys.modules, "fdsm_ext._build_info", types.SimpleNamespace(TORCH_VERSION=public + "+cu999"))
    ext.check_build_matches_torch()


def test_import_in_a_fresh_process_refuses_a_mismatched_build(tmp_path):
    # The real import path: a copy of the package whose build info names another torch (and no _C,
    # which the check must refuse before trying to load).
    pkg = tmp_path / "fdsm_ext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import _ext\n")
    (pkg / "_ext.py").write_text((ROOT / "fdsm_ext" / "_ext.py").read_text())
    (pkg / "_build_info.py").write_text("TORCH_VERSION = '1.13.1'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "import fdsm_ext"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fdsm_ext's compiled extension was built against torch 1.13.1"), last
