"""Installing and loading the native extension: the build record, the rebuild for another torch,
the fallback's message, and a real `pip install --no-build-isolation .` into a fresh venv."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aaa_fast.ops import build_config

REPO = Path(__file__).resolve().parents[1]

# Runs in a subprocess: which backend the CPU gets and whether the op matches the reference.
PROBE = textwrap.dedent("""
    import json, torch
    from aaa_fast import ops
    from aaa_fast.ops import native
    g = torch.Generator().manual_seed(0)
    x_nat = torch.rand(6, 3, 4, 4, generator=g)
    x_adv = (x_nat + 0.05 * torch.randn(6, 3, 4, 4, generator=g)).clamp(0, 1)
    grad = torch.randn(6, 3, 4, 4, generator=g)
    args = (torch.tensor([1., -1., 1., -1., 1., 1.]), torch.full((6,), 0.1), torch.full((6,), 0.03))
    out = ops.pgd_step(x_adv, x_nat, grad, *args)
    ref = ops.pgd_step_reference(x_adv, x_nat, grad, *args)
    print(json.dumps({"error": native.LOAD_ERROR, "backend": ops.get_backend(torch.device("cpu")),
                      "native": native.has_cpu_kernels(), "equal": bool(torch.equal(out, ref))}))
""")


def package_copy(tmp_path, record=None, sources=True, corrupt_binary=False) -> Path:
    """A copy of the installed package, as pip would lay it out, with a chosen build record."""
    root = tmp_path / "site"
    shutil.copytree(REPO / "aaa_fast", root / "aaa_fast", ignore=shutil.ignore_patterns("__pycache__", "_csrc"))
    if sources:
        shutil.copytree(REPO / "csrc", root / "aaa_fast" / "_csrc")
    info = root / "aaa_fast" / build_config.BUILD_INFO_NAME
    if record is None:
        info.unlink(missing_ok=True)
    else:
        info.write_text(json.dumps(record))
    if corrupt_binary:
        for so in (root / "aaa_fast").glob("_C*.so"):
            so.write_bytes(b"not an ELF file")
    return root


def probe(root: Path, tmp_path, **env):
    environment = {**os.environ, "PYTHONPATH": str(root), "AAA_FAST_CACHE": str(tmp_path / "cache"), **env}
    environment.pop("AAA_FAST_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_build_record_names_the_running_torch():
    record = json.loads((REPO / "aaa_fast" / build_config.BUILD_INFO_NAME).read_text())
    assert record["torch"] == torch.__version__


@pytest.mark.slow
def test_binary_for_another_torch_is_rebuilt_for_this_one(tmp_path):
    root = package_copy(tmp_path, record={"torch": "0.0.1", "cuda_kernels": False})
    result, stderr = probe(root, tmp_path)
    assert result == {"error": None, "backend": "cpu", "native": True, "equal": True}
    assert "built for torch 0.0.1" in stderr and f"this is torch {torch.__version__}" in stderr
    assert any((tmp_path / "cache").rglob("aaa_fast_C.so"))
    # the second import reuses the cached build without compiling again
    result, stderr = probe(root, tmp_path)
    assert result["native"] and "compiling" not in stderr


def test_rebuild_disabled_falls_back_with_the_reason_and_the_fix(tmp_path):
    root = package_copy(tmp_path, record={"torch": "0.0.1"})
    result, stderr = probe(root, tmp_path, AAA_FAST_NO_REBUILD="1")
    assert result["backend"] == "torch" and not result["native"] and result["equal"]
    assert "built for torch 0.0.1" in result["error"] and "AAA_FAST_NO_REBUILD=1" in result["error"]
    assert "pip install --no-build-isolation --force-reinstall ." in stderr
    assert "circular import" not in stderr


def test_unloadable_binary_without_sources_says_so(tmp_path):
    root = package_copy(tmp_path, record=None, sources=False, corrupt_binary=True)
    shutil.rmtree(root / "csrc", ignore_errors=True)
    result, stderr = probe(root, tmp_path)
    assert not result["native"] and result["backend"] == "torch"
    assert "importing aaa_fast._C failed" in result["error"]
    assert "sources are not installed" in result["error"]


def test_default_cuda_arch_list_only_without_visible_gpus(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    build_config.set_default_cuda_arch_list(visible_devices=1)
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    build_config.set_default_cuda_arch_list(visible_devices=0)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == build_config.DEFAULT_CUDA_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    build_config.set_default_cuda_arch_list(visible_devices=0)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"


@pytest.mark.parametrize("value,expected", [("0", False), ("1", True)])
def test_build_cuda_switch(monkeypatch, value, expected):
    monkeypatch.setenv("AAA_FAST_BUILD_CUDA", value)
    assert build_config.want_cuda(None, None) is expected
    monkeypatch.setenv("AAA_FAST_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="AAA_FAST_BUILD_CUDA must be 0 or 1"):
        build_config.want_cuda("12.4", "/usr/local/cuda")


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv(tmp_path):
    """README's own-environment path: a fresh venv, torch, `pip install --no-build-isolation .`
    (not editable), then the extension loads outside the checkout with its sources shipped."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # the parent environment's torch is visible through --system-site-packages only when the test
    # itself runs from a system interpreter; point the fresh venv at the running torch explicitly
    site = Path(torch.__file__).resolve().parents[1]
    pth = next((venv / "lib").glob("python3.*/site-packages"))
    (pth / "parent_torch.pth").write_text(str(site) + "\n")
    source = tmp_path / "src"
    top_level = {".venv", ".git", "build", "data", "runs", "experiments"}  # aaa_fast/data is a package: keep it
    built = shutil.ignore_patterns("*.so", "_C_build.json", "__pycache__", "*.egg-info")
    shutil.copytree(REPO, source, ignore=lambda d, names: set(built(d, names)) | (
        top_level & set(names) if os.path.samefile(d, REPO) else set()))
    # --no-build-isolation uses the environment's build tools: the README installs them first
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "setuptools>=64", "wheel"],
                   check=True, capture_output=True, timeout=600)
    done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "."],
                          cwd=source, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = subprocess.run(
        [python, "-c", "import aaa_fast, aaa_fast.train, aaa_fast.ops.native as n, pathlib; "
         "p = pathlib.Path(aaa_fast.__file__).parent; "
         "print(n.LOAD_ERROR, (p / '_csrc' / 'ops.cpp').is_file(), (p / '_C_build.json').is_file(), p)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    error, sources, record, where = installed.stdout.split()
    assert (error, sources, record) == ("None", "True", "True")
    assert str(source) not in where and "site-packages" in where
