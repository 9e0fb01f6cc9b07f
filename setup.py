"""The compiled parts: the fork server's C loop (proxy/_forkloop.c), and the launcher that
dockerd can run in docker-proxy's place (proxy/launcher*.c, an executable installed beside the
console scripts as ``pyengine-docker-proxy``). Metadata: pyproject.toml."""

import os
from distutils.command.build_scripts import build_scripts  # setuptools vendors it as distutils

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

LAUNCHER = "pyengine-docker-proxy"
LAUNCHER_DIR = os.path.join("build", "launcher")


class BuildWithLauncher(build_ext):
    """build_ext, and the launcher executable, where the scripts step picks it up."""

    def run(self) -> None:
        super().run()
        objects = self.compiler.compile(
            ["proxy/launcher.c", "proxy/launcher_server.c"],
            depends=["proxy/launcher.h", "proxy/forkproto.h"],
            output_dir=self.build_temp,
            extra_postargs=["-O2", "-Wall"],
        )
        self.compiler.link_executable(objects, LAUNCHER, output_dir=LAUNCHER_DIR)


class CopyExecutables(build_scripts):
    """The one script is an executable, not a Python script: copied as it is."""

    def copy_scripts(self) -> tuple[list[str], list[str]]:
        self.mkpath(self.build_dir)
        copied = []
        for script in self.scripts:
            target = os.path.join(self.build_dir, os.path.basename(script))
            self.copy_file(script, target)
            os.chmod(target, 0o755)
            copied.append(target)
        return copied, copied


setup(
    ext_modules=[
        Extension("proxy._forkloop", ["proxy/_forkloop.c"], depends=["proxy/forkproto.h"])
    ],
    cmdclass={"build_ext": BuildWithLauncher, "build_scripts": CopyExecutables},
    scripts=[os.path.join(LAUNCHER_DIR, LAUNCHER)],
)
