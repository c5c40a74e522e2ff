"""Build script: compiles san's Cython extensions with the machine's compiler.

Metadata lives in pyproject.toml; only the extension list is here."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("san._fastmap", ["san/_fastmap.pyx"], extra_compile_args=["-O3"]),
    Extension("san.agent._blockio", ["san/agent/_blockio.pyx"], extra_compile_args=["-O3"]),
    Extension("san.iscsi._wire", ["san/iscsi/_wire.pyx"], extra_compile_args=["-O3"]),
    Extension("san.lio._ring", ["san/lio/_ring.pyx"], extra_compile_args=["-O3"]),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    package_data={
        "san": [
            "_fastmap.pxd", "_fastmap.pyi", "py.typed", "agent/_blockio.pyi", "agent/_blockio.pxd", "iscsi/_wire.pyi",
            "lio/_ring.pyi",
        ]
    },
)
