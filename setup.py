"""The one compiled part: the fork server's C loop (proxy/_forkloop.c). Metadata: pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy._forkloop", ["proxy/_forkloop.c"])])
