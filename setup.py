"""Build script: Python packages plus the CUDA extension ``efficient_ops._C`` (CMake + ninja).

Metadata lives in pyproject.toml; this file adds the package layout and the extension build.

Environment variables
---------------------
EFFICIENT_OPS_BUILD_CUDA   auto (default): build ``_C`` when nvcc is found, otherwise record why in
                           efficient_ops/_C_not_built.txt (``efficient-ops info`` prints it: pip shows
                           this script's output only with -v) and install the pure-Python package
                           (Triton / reference backends only).
                           0: never build it.  1: require it; a missing nvcc is an error.
                           In every mode, a CUDA build that was started and failed fails the install:
                           a broken kernel build must never be hidden behind a silent fallback.
EFFICIENT_OPS_CUDA_ARCHS   CUDA architectures, ';' or ',' separated (default "80;90a"). An entry such
                           as "90a" compiles SASS only (-gencode=arch=compute_90a,code=sm_90a).
MAX_JOBS                   parallel compile jobs (also nvcc --threads); falls back to
                           CMAKE_BUILD_PARALLEL_LEVEL, then to the CPU count.
CUDA_HOME / CUDA_PATH      toolkit root; when set, nvcc is taken from there only. Otherwise nvcc
                           comes from CUDACXX, PATH, then /usr/local/cuda.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_NAME = "efficient_ops._C"
DEFAULT_ARCHS = "80;90a"
MIN_CMAKE = (3, 24)
SKIP_NOTE = ROOT / "efficient_ops" / "_C_not_built.txt"  # installed with the package when _C is skipped


def _log(msg: str) -> None:
    print(f"efficient_ops setup: {msg}", file=sys.stderr, flush=True)


def _build_mode() -> str:
    raw = os.environ.get("EFFICIENT_OPS_BUILD_CUDA", "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "false", "off", "no"):
        return "off"
    if raw in ("1", "true", "on", "yes"):
        return "on"
    sys.exit(f"efficient_ops setup: EFFICIENT_OPS_BUILD_CUDA must be auto, 0 or 1 (got {raw!r})")


def _find_nvcc() -> tuple[str | None, str]:
    """Return (path to nvcc or None, where we looked)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:  # an explicit toolkit root wins, and is not second-guessed
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file():
                return str(nvcc), f"{var}={home}"
            return None, f"{var}={home}, which has no bin/nvcc"
    cudacxx = os.environ.get("CUDACXX")
    if cudacxx and Path(cudacxx).is_file():
        return cudacxx, f"CUDACXX={cudacxx}"
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path, "PATH"
    default = Path("/usr/local/cuda/bin/nvcc")
    if default.is_file():
        return str(default), str(default)
    return None, "CUDA_HOME, CUDA_PATH, CUDACXX, PATH and /usr/local/cuda"


def _parallel_jobs(build_ext_parallel: int | None) -> int:
    for var in ("MAX_JOBS", "CMAKE_BUILD_PARALLEL_LEVEL"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                sys.exit(f"efficient_ops setup: {var} must be an integer (got {value!r})")
    if build_ext_parallel:
        return max(1, int(build_ext_parallel))
    return max(1, os.cpu_count() or 1)


def _cuda_archs() -> str:
    raw = os.environ.get("EFFICIENT_OPS_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    archs = [a.strip() for a in re.split(r"[;,\s]+", raw) if a.strip()]
    if not archs:
        sys.exit("efficient_ops setup: EFFICIENT_OPS_CUDA_ARCHS is empty")
    return ";".join(archs)


def _cmake_executable() -> str:
    candidates = []
    try:  # the `cmake` PyPI package (a build requirement) is preferred over the system cmake
        import cmake

        candidates.append(str(Path(cmake.CMAKE_BIN_DIR) / "cmake"))
    except ImportError:
        pass
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    for exe in candidates:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True)
        m = re.search(r"version (\d+)\.(\d+)", out.stdout)
        if out.returncode == 0 and m and (int(m[1]), int(m[2])) >= MIN_CMAKE:
            return exe
    raise RuntimeError(
        f"efficient_ops: building the CUDA extension needs CMake >= {'.'.join(map(str, MIN_CMAKE))} "
        f"(found: {candidates or 'none'}); `pip install cmake` or set EFFICIENT_OPS_BUILD_CUDA=0"
    )


def _ninja_executable() -> str | None:
    try:
        import ninja

        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.is_file():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("ninja")


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into the directory setuptools expects the module in.

    Non-editable installs: build/lib.../efficient_ops/_C*.so, packed into the wheel.
    Editable installs: setuptools then copies it to efficient_ops/_C*.so in the source tree.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        nvcc, where = _find_nvcc()
        if nvcc is None:  # only reachable with EFFICIENT_OPS_BUILD_CUDA=1
            raise SystemExit(
                f"\nefficient_ops: EFFICIENT_OPS_BUILD_CUDA=1 but nvcc was not found (looked in {where}).\n"
                "Set CUDA_HOME to the CUDA toolkit root, or install without the extension: "
                "EFFICIENT_OPS_BUILD_CUDA=0.\n"
            )
        try:
            self._build_cmake(ext, nvcc, where)
        except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as err:
            # Reaching here means nvcc was found (or required): never hide a failed build.
            raise SystemExit(
                f"\nefficient_ops: building the CUDA extension {ext.name} failed: {err}\n"
                "Fix the error above, or install without the extension: EFFICIENT_OPS_BUILD_CUDA=0.\n"
            ) from err

    def _build_cmake(self, ext: CMakeExtension, nvcc: str, where: str) -> None:
        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        if getattr(self, "editable_mode", False):
            # Editable installs get a throw-away build_temp; a fixed CMake tree under build/ keeps
            # rebuilds incremental (ninja recompiles only what changed).
            build_dir = ROOT / "build" / f"cmake-{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = _parallel_jobs(self.parallel)
        archs = _cuda_archs()

        # A CMake cache configured with another nvcc or generator cannot be reused: start afresh.
        ninja = _ninja_executable()
        generator = "Ninja" if ninja else None
        stamp = build_dir / "efficient_ops_configured_with.txt"
        configured_with = f"nvcc={nvcc}\ngenerator={generator}\n"
        if stamp.is_file() and stamp.read_text() != configured_with:
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)

        cmake = _cmake_executable()
        configure = [
            cmake,
            "-S", ext.source_dir,
            "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_path.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DEFFICIENT_OPS_NVCC_THREADS={min(jobs, 8)}",
            f"-DEFFICIENT_OPS_PTXAS_VERBOSE={'ON' if os.environ.get('EFFICIENT_OPS_PTXAS_VERBOSE') == '1' else 'OFF'}",
        ]
        if generator:
            configure += ["-G", generator, f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _log(f"building {ext.name} with nvcc {nvcc} ({where}) for CUDA archs {archs}, {jobs} jobs")
        subprocess.run(configure, check=True)
        stamp.write_text(configured_with)
        build = [cmake, "--build", str(build_dir), "--parallel", str(jobs)]
        if self.verbose or os.environ.get("VERBOSE"):
            build.append("--verbose")
        subprocess.run(build, check=True)

        if not ext_path.is_file():
            raise RuntimeError(f"CMake finished but {ext_path} was not produced")


def _record_skip(reason: str | None) -> None:
    """Write why the extension was skipped into the package (``efficient-ops info`` prints it), or remove a
    stale note when it is built: pip shows this script's output only with -v or on failure."""
    if reason is None:
        SKIP_NOTE.unlink(missing_ok=True)
        return
    _log(reason)
    SKIP_NOTE.write_text(reason + "\n")


def _extensions() -> list[Extension]:
    mode = _build_mode()
    if mode == "off":
        _record_skip("not built: the install set EFFICIENT_OPS_BUILD_CUDA=0")
        return []
    nvcc, where = _find_nvcc()
    if nvcc is None and mode == "auto":
        _record_skip(
            f"not built: nvcc was not found at install time (looked in {where}); the Triton and reference "
            "backends remain available. Reinstall with CUDA_HOME set to the CUDA toolkit root to build it, "
            "or with EFFICIENT_OPS_BUILD_CUDA=1 to make a missing nvcc an error."
        )
        return []
    _record_skip(None)
    return [CMakeExtension(EXT_NAME, ROOT)]


setup(
    # triton_kernels/ and bench/ live at the top level of the repository but install as
    # efficient_ops.triton_kernels and efficient_ops.bench: no top-level `triton_kernels` package
    # (Triton's own MoE kernels use that name) and no top-level `bench`.
    packages=find_packages(include=["efficient_ops", "efficient_ops.*"])
    + ["efficient_ops.triton_kernels", "efficient_ops.bench"]
    + [f"efficient_ops.triton_kernels.{p}" for p in find_packages("triton_kernels")]
    + [f"efficient_ops.bench.{p}" for p in find_packages("bench")],
    package_dir={
        "efficient_ops.triton_kernels": "triton_kernels",
        "efficient_ops.bench": "bench",
    },
    ext_modules=_extensions(),
    package_data={"efficient_ops": [SKIP_NOTE.name]},
    cmdclass={"build_ext": CMakeBuild},
)
