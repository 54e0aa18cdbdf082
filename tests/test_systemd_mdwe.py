"""MemoryDenyWriteExecute=yes in the unit must not break ONNX Runtime or the server's imports.

systemd implements the setting as a seccomp filter (seccomp-util.c: refuse mmap with
PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC, all with
EPERM). The child process installs that same filter (helpers/sandbox.py), proves it bites, then builds and
runs a real ONNX Runtime session and imports the server packages. Linux x86-64 only.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
from helpers.sandbox import MDWE_FILTER

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the seccomp filter below is written for Linux x86-64 system call numbers",
)


def _run_under_mdwe(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MDWE_FILTER + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_filter_refuses_writable_executable_memory() -> None:
    result = _run_under_mdwe(
        """
        import mmap
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except PermissionError:
            print("refused")
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(address, 4096, mmap.PROT_READ | mmap.PROT_EXEC) != 0 and ctypes.get_errno() == 1:
            print("refused")
        assert libc.mprotect(address, 4096, mmap.PROT_READ) == 0
        print("plain memory ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused", "refused", "plain", "memory", "ok"]


def test_onnxruntime_runs_a_session_under_memory_deny_write_execute() -> None:
    result = _run_under_mdwe(
        """
        import numpy as np
        import onnx
        from onnx import TensorProto, helper
        import onnxruntime as ort

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
        w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"], axis=-1)],
            "mdwe", [x], [y], [w],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {"x": np.ones((8, 4), dtype=np.float32)})[0]
        assert out.shape == (8, 3) and np.allclose(out.sum(axis=1), 1.0)
        print("ort ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ort ok" in result.stdout


def test_server_packages_import_under_memory_deny_write_execute() -> None:
    result = _run_under_mdwe(
        """
        import importlib, pkgutil
        import appliance, appliance.cli
        for name in ("appliance.app", "appliance.api", "appliance.runtime", "appliance.generation",
                     "appliance.store", "appliance.kernels", "appliance.admin"):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if not exc.name or not exc.name.startswith("appliance"):
                    raise
        import argon2, sqlalchemy, uvicorn, fastapi, tokenizers, prometheus_client
        argon2.PasswordHasher().hash("x")
        try:
            import onnxruntime_genai  # the LLM engine's optional fast path
        except ImportError:
            pass
        print("imports ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imports ok" in result.stdout
