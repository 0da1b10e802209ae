"""The CUDA build (CMakeLists.txt, cpp/src/cuda/): compiled wherever a CUDA compiler exists, the
module importing and reporting "no GPU" cleanly on a machine without a driver or device.

CI has nvcc 13.0 and no GPU, so there these check that the CUDA code was compiled in and that
cudart's "no driver" / "no device" errors become an empty device list with a reason.
"""

import os
import shutil
import subprocess
import sys

import pytest

import prosparse_rt
from prosparse_rt import _core


def _cuda_compiler_on_this_machine():
    # What CMakeLists.txt's AUTO looks for: CUDACXX, nvcc on the PATH, or the toolkit's usual home.
    return bool(os.environ.get("CUDACXX") or shutil.which("nvcc")
                or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_cuda_is_compiled_where_a_cuda_compiler_exists():
    # AUTO must find nvcc under pip's build environment; a build without CUDA here would mean CI
    # no longer compiles the CUDA code. Only a build asked for with PROSPARSE_CUDA=OFF may lack it.
    st = prosparse_rt.cuda_status()
    assert isinstance(st["compiled"], bool)
    if _cuda_compiler_on_this_machine() and "PROSPARSE_CUDA=OFF" not in st["reason"]:
        assert st["compiled"], st["reason"]


def test_status_shape_and_devices():
    st = prosparse_rt.cuda_status()
    assert set(st) == {"compiled", "devices", "reason"}
    assert prosparse_rt.cuda_devices() == st["devices"]
    for d in st["devices"]:
        assert set(d) == {"index", "name", "compute_capability", "total_memory", "free_memory"}
        major, minor = (int(x) for x in d["compute_capability"].split("."))
        assert (major, minor) >= (7, 5)
        assert 0 < d["free_memory"] <= d["total_memory"]
    if not st["devices"]:
        assert st["reason"]


def test_no_gpu_gives_an_empty_list_and_says_why():
    # No driver (cudaErrorInsufficientDriver, 35) or no device (cudaErrorNoDevice, 100) is not an
    # error: [] and a reason naming it. Only meaningful on a machine without a usable GPU.
    st = prosparse_rt.cuda_status()
    if st["devices"]:
        pytest.skip("this machine has a usable GPU")
    assert prosparse_rt.cuda_devices() == []
    reason = st["reason"].lower()
    if st["compiled"]:
        assert "driver" in reason or "no cuda device" in reason or "not usable" in reason, reason
    else:
        assert "built without cuda" in reason, reason


def test_module_imports_without_cuda_libraries():
    # cudart is linked statically: the extension needs no libcudart*.so (and no libcuda, which
    # cudart opens only at the first CUDA call). A fresh interpreter imports it and queries.
    so = _core.__file__
    if sys.platform.startswith("linux") and shutil.which("ldd"):
        deps = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
        assert "libcudart" not in deps and "libcuda." not in deps and "cublas" not in deps, deps
    out = subprocess.run([sys.executable, "-c", "import prosparse_rt; print(prosparse_rt.cuda_devices())"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
