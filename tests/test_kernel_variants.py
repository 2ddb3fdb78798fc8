"""The SIMD128 variants are wired in: the registry built from static/wasm/ has a `_simd` build
for every kernel, a node that reports SIMD128 is sent it and the others the scalar one
(dispatch.pick_module), and the task kinds still name the scalar module (the variant is the
gateway's choice per node, never the job's)."""

from __future__ import annotations

import pytest
import wasmtime
from processdistro.shared.core import dispatch
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.tasks.hashing import HashPlugin
from processdistro.shared.tasks.mandelbrot import MandelbrotPlugin

KERNELS = ["mandelbrot", "matrix_mul", "password_hash"]


@pytest.fixture(scope="module")
def registry() -> ModuleRegistry:
    return ModuleRegistry()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("simd", [True, False], ids=["simd-node", "scalar-node"])
def test_nodes_get_the_build_for_their_engine(registry: ModuleRegistry, kernel: str, simd: bool) -> None:
    scalar = registry.get(kernel)
    chosen = dispatch.pick_module(registry.by_sha, registry.by_name, scalar.sha256, simd=simd)
    assert chosen is not None
    assert chosen.name == (f"{kernel}_simd" if simd else kernel)
    assert chosen.sha256 != scalar.sha256 or not simd


@pytest.mark.parametrize("kernel", KERNELS)
def test_simd_builds_need_simd128_and_scalar_builds_do_not(registry: ModuleRegistry, kernel: str) -> None:
    """A node without SIMD128 could not even compile the variant: that is why it gets the
    scalar build."""
    no_simd = wasmtime.Config()
    no_simd.wasm_simd = False
    no_simd.wasm_relaxed_simd = False
    engine = wasmtime.Engine(no_simd)
    wasmtime.Module.validate(engine, registry.get(kernel).data)
    with pytest.raises(wasmtime.WasmtimeError):
        wasmtime.Module.validate(engine, registry.get(f"{kernel}_simd").data)


def test_task_kinds_name_the_scalar_module() -> None:
    assert MandelbrotPlugin.module == "mandelbrot"
    assert HashPlugin.module == "password_hash"
