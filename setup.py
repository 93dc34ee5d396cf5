"""The package build beside pyproject.toml (which holds everything else): pure Python, unless
GATEWAY_COMPILE=1, which compiles pyproject's [tool.gateway] compiled modules with mypyc, each module's
.so beside its .py (which stays the fallback). In place for the tests: .ci/compile."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from setuptools import setup

if os.environ.get("GATEWAY_COMPILE") == "1":
    from mypyc.build import mypycify

    project = tomllib.loads((Path(__file__).resolve().parent / "pyproject.toml").read_text())
    mypy = next(r for r in project["project"]["optional-dependencies"]["dev"] if r.startswith("mypy"))
    setup(
        # mypyc type-checks the modules it compiles, so an isolated build needs what they import.
        setup_requires=[mypy, *project["project"]["dependencies"]],
        # One extension a module: mypyc's single shared library would derive a wrong __file__ and
        # __path__ for the modules inside the package it lives in.
        ext_modules=mypycify(project["tool"]["gateway"]["compiled"], separate=True, opt_level="3"),
    )
else:
    setup()
