"""Which BLAS kernels the matrix products run on, and faiss imported so that it runs numpy's.

numpy's wheels and faiss-cpu's each bundle their own OpenBLAS, and each picks its
kernels (its "core") once, when the library loads: from ``OPENBLAS_CORETYPE`` if
set, else by detecting the CPU. faiss-cpu 1.15's OpenBLAS is 0.3.15 (2021); on a
CPU it does not know it falls back to its generic kernels (on this project's
Zen 5-class host: "Prescott", flat search 86 GFLOP/s against 330-430 on its
AVX-512 "SkylakeX" kernels), while numpy's OpenBLAS 0.3.31 detects the same CPU
correctly. ``import_faiss`` therefore loads faiss with the core numpy's OpenBLAS
chose when the environment sets none; a core the environment sets is respected.

``describe`` reports the cores a process runs on, with advice when they leave
the CPU's vector units unused; the pipeline records it for the driver and for
one executor task in report.json (``blas``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger("dedup_spark")

# OpenBLAS cores with AVX2 + FMA kernels, and those of them with AVX-512 kernels (OpenBLAS's names).
AVX512_CORES = frozenset({"SkylakeX", "Cooperlake", "SapphireRapids"})
_AVX2_ONLY_CORES = frozenset({"Haswell", "Zen"})
AVX2_CORES = AVX512_CORES | _AVX2_ONLY_CORES
# What faiss-cpu's OpenBLAS 0.3.15 can be told: it predates SapphireRapids, whose instructions
# are a superset of Cooperlake's; a name it does not know would make it detect (and fall back).
_FAISS_OPENBLAS_CORE = {"SapphireRapids": "Cooperlake"}
_FAISS_OPENBLAS_KNOWS = frozenset({"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Sandybridge",
                                   "Haswell", "SkylakeX", "Cooperlake", "Opteron", "Barcelona", "Bulldozer",
                                   "Piledriver", "Steamroller", "Excavator", "Zen", "Atom", "Nano"})
_AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"})


def cpu_vector_level() -> str:
    """``avx512``, ``avx2`` or ``baseline``, from /proc/cpuinfo (``unknown`` where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return "unknown"
    if _AVX512_FLAGS <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "baseline"


def openblas_cores() -> dict[str, str]:
    """The core of every OpenBLAS loaded in this process, by the wheel that bundles it (``numpy``,
    ``faiss``, ``scipy``, else the file name). Empty where /proc/self/maps does not exist."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in maps) if len(fields) == 6}
    except OSError:
        return {}
    cores = {}
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()):
        core = _core_of(path)
        if core is not None:
            cores[_package_of(path)] = core
    return cores


def _package_of(path: str) -> str:
    """The wheel that bundles a library (``numpy.libs/`` -> numpy, ``faiss_cpu.libs/`` -> faiss), else its file name."""
    folder = os.path.basename(os.path.dirname(path))
    if not folder.endswith(".libs"):
        return os.path.basename(path)
    package = folder[:-len(".libs")]
    return "faiss" if package.startswith("faiss") else package


def _core_of(path: str) -> str | None:
    """OpenBLAS's openblas_get_corename, under the symbol prefixes and suffixes its builds use."""
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None
    for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                 "openblas_get_corename"):
        function = getattr(library, name, None)
        if function is not None:
            function.restype = ctypes.c_char_p
            return function().decode("ascii", "replace")
    return None


def import_faiss() -> ModuleType:
    """faiss, loaded (on first use in the process) with the OpenBLAS core numpy's OpenBLAS detected,
    unless OPENBLAS_CORETYPE is set. The variable is set only while faiss loads: nothing else in
    the process, nor a process it starts, sees it."""
    if "faiss" in sys.modules or os.environ.get("OPENBLAS_CORETYPE"):
        import faiss

        return faiss
    import numpy  # noqa: F401  (loads numpy's OpenBLAS, whose detection is asked below)

    core = openblas_cores().get("numpy")
    core = _FAISS_OPENBLAS_CORE.get(core, core)
    if core not in _FAISS_OPENBLAS_KNOWS:
        import faiss

        return faiss
    os.environ["OPENBLAS_CORETYPE"] = core
    try:
        import faiss
    finally:
        del os.environ["OPENBLAS_CORETYPE"]
    return faiss


def describe() -> dict[str, Any]:
    """This process's CPU vector level, OPENBLAS_CORETYPE and OpenBLAS cores (numpy and faiss
    loaded first), with ``warnings`` where a library runs generic kernels on a CPU with AVX2 or
    AVX-512, and ``advice`` where OPENBLAS_CORETYPE pins AVX2 kernels on a CPU with AVX-512."""
    import_faiss()  # and numpy, which faiss imports
    level = cpu_vector_level()
    pinned = os.environ.get("OPENBLAS_CORETYPE") or None
    cores = openblas_cores()
    names = {"avx512": "AVX-512", "avx2": "AVX2"}
    generic = sorted(lib for lib, core in cores.items() if level in names and core not in AVX2_CORES)
    narrow = sorted(lib for lib, core in cores.items() if level == "avx512" and pinned and core in _AVX2_ONLY_CORES)
    warnings, advice = [], []
    if generic:
        warnings.append(f"{_listed(generic)} OpenBLAS run generic kernels "
                        f"({', '.join(cores[lib] for lib in generic)}) on a CPU with {names[level]}: their matrix "
                        f"products are several times slower; set OPENBLAS_CORETYPE (Haswell, or SkylakeX with "
                        f"AVX-512) for the driver and spark.executorEnv.OPENBLAS_CORETYPE for the executors")
    if narrow:
        advice.append(f"{_listed(narrow)} OpenBLAS run AVX2 kernels on a CPU with AVX-512 because "
                      f"OPENBLAS_CORETYPE={pinned}: on the bench host SkylakeX ran the search kernel 1.6x faster")
    return {"cpu": level, "OPENBLAS_CORETYPE": pinned, "openblas": cores, "warnings": warnings, "advice": advice}


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def report(spark) -> dict[str, Any]:
    """The OpenBLAS cores (``describe``) of the driver and of one executor task, logged: the
    search kernel and the assignment are matrix products, and a library on generic kernels runs
    them several times slower without any other sign, so that is a warning."""
    driver = describe()
    executor = spark.sparkContext.parallelize([0], 1).map(lambda _: describe()).first()
    for where, described in (("driver", driver), ("executor", executor)):
        cores = ", ".join(f"{library} {core}" for library, core in sorted(described["openblas"].items()))
        log.info("BLAS on the %s: OpenBLAS %s (CPU %s, OPENBLAS_CORETYPE %s)", where, cores or "not found",
                 described["cpu"], described["OPENBLAS_CORETYPE"] or "unset")
        for warning in described["warnings"]:
            log.warning("BLAS on the %s: %s", where, warning)
        for advice in described["advice"]:
            log.info("BLAS on the %s: %s", where, advice)
    return {"driver": driver, "executor": executor}
