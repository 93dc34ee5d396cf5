"""Which build the tests run: with GATEWAY_COMPILE=1 every module of pyproject.toml's [tool.gateway]
compiled is mypyc's extension (.ci/compile), without it every one is its .py; so neither build can pass
for the other, and a module edited after it was compiled is not tested as its old self."""

from __future__ import annotations

import importlib
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPILED: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["gateway"]["compiled"]


def module_name(path: str) -> str:
    """gateway/engine/__init__.py -> gateway.engine; gateway/store/resp.py -> gateway.store.resp"""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


@pytest.mark.unit
def test_module_names_follow_the_paths() -> None:
    assert module_name("gateway/engine/__init__.py") == "gateway.engine"
    assert module_name("gateway/store/resp.py") == "gateway.store.resp"


@pytest.mark.unit
@pytest.mark.parametrize("path", COMPILED)
def test_each_hot_module_is_of_the_build_asked_for(path: str) -> None:
    source = ROOT / path
    assert source.is_file(), f"pyproject.toml's [tool.gateway] compiled names {path}, which does not exist"
    loaded = Path(importlib.import_module(module_name(path)).__file__ or "")
    if os.environ.get("GATEWAY_COMPILE") == "1":
        assert loaded.suffix == ".so", f"{path} runs pure Python though GATEWAY_COMPILE=1: run .ci/compile"
        assert loaded.stat().st_mtime >= source.stat().st_mtime, (
            f"{path} changed after it was compiled, and the old .so runs: run .ci/compile again"
        )
    else:
        assert loaded == source, f"{path} runs as {loaded.name}, though GATEWAY_COMPILE is unset: run `.ci/compile clean`"
