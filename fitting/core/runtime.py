"""Choose and initialise the Mitsuba/Dr.Jit variant before anything imports drjit.

Why this module exists: Dr.Jit 1.5's LLVM backend needs LLVM >= 19 (LLVM 14/15 abort the
whole interpreter with ``LLVM ERROR: Cannot select ... fminimum``), and Dr.Jit only reads
``DRJIT_LIBLLVM_PATH`` when it is first imported. So every matfit entry point calls
:func:`init_mitsuba` and never imports drjit/mitsuba at module level itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import re
import sys
from dataclasses import dataclass, field

from fitting.core.errors import RuntimeSetupError

MIN_LLVM = 19
APT_HINT = ("install LLVM 19 with `apt-get install -y libllvm19` (or run ./install.sh), "
            "or point DRJIT_LIBLLVM_PATH at a libLLVM.so of version 19 or newer")


@dataclass
class RuntimeInfo:
    variant: str
    backend: str                 # "cuda" or "llvm"
    llvm_path: str | None
    llvm_version: str | None
    gpu: str | None
    threads: int
    notes: list[str] = field(default_factory=list)


_STATE: RuntimeInfo | None = None


def llvm_version_of(path: str) -> tuple[int, int, int] | None:
    """Ask a libLLVM for its version (LLVMGetVersion exists since LLVM 16). None if unloadable."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError:
        return None
    fn = getattr(lib, "LLVMGetVersion", None)
    if fn is None:  # LLVM <= 15 lacks the symbol; read the version from the file name instead
        m = re.search(r"LLVM-(\d+)", os.path.basename(path))
        return (int(m.group(1)), 0, 0) if m else (0, 0, 0)
    major, minor, patch = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
    fn.restype = None
    fn(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    return (major.value, minor.value, patch.value)


def candidate_llvm_paths() -> list[str]:
    """libLLVM files on this machine, newest-looking first."""
    pats = ["/usr/lib/x86_64-linux-gnu/libLLVM-*.so*", "/usr/lib/aarch64-linux-gnu/libLLVM-*.so*",
            "/usr/lib/llvm-*/lib/libLLVM*.so*", "/usr/local/lib/libLLVM*.so*", "/usr/lib64/libLLVM*.so*",
            "/opt/homebrew/opt/llvm/lib/libLLVM.dylib"]
    found: list[str] = []
    for pat in pats:
        found.extend(glob.glob(pat))
    name = ctypes.util.find_library("LLVM")
    if name:
        found.append(name)

    def key(p: str) -> int:
        m = re.search(r"(?:LLVM-|llvm-)(\d+)", p)
        return int(m.group(1)) if m else 0
    uniq = sorted(set(found), key=key, reverse=True)
    return uniq


def find_llvm(min_major: int = MIN_LLVM) -> tuple[str, str]:
    """Return (path, version) of a usable libLLVM, or raise RuntimeSetupError saying what to do."""
    env = os.environ.get("DRJIT_LIBLLVM_PATH")
    tried: list[str] = []
    paths = ([env] if env else []) + candidate_llvm_paths()
    for path in paths:
        ver = llvm_version_of(path)
        if ver is None:
            tried.append(f"{path} (cannot be loaded)")
            continue
        if ver[0] >= min_major:
            return path, "%d.%d.%d" % ver
        tried.append(f"{path} (LLVM {ver[0]})")
    detail = "; ".join(tried) if tried else "no libLLVM found"
    raise RuntimeSetupError(
        f"matfit needs LLVM {min_major} or newer for CPU rendering; found: {detail}. "
        "LLVM 14/15 make Dr.Jit abort with 'LLVM ERROR: Cannot select ... fminimum'.",
        hint=APT_HINT)


def cuda_device_name() -> str | None:
    """Name of the first CUDA device, asked through the driver API (no torch/drjit import)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    try:
        if cuda.cuInit(0) != 0:
            return None
        count = ctypes.c_int()
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
            return None
        dev = ctypes.c_int()
        cuda.cuDeviceGet(ctypes.byref(dev), 0)
        buf = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(buf, 256, dev)
        return buf.value.decode(errors="replace")
    except Exception:  # a broken driver is the same as no GPU for us
        return None


def default_threads() -> int:
    """Leave one core to the GUI / the OS; never fewer than one render thread."""
    return max(1, (os.cpu_count() or 2) - 1) if (os.cpu_count() or 1) > 2 else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16), where
    oneDNN runs bfloat16 convolutions about twice as fast as float32 (see FitOptions)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def init_mitsuba(device: str = "auto", threads: int | None = None) -> RuntimeInfo:
    """Pick the variant (``cuda_ad_rgb`` when a GPU works, else ``llvm_ad_rgb``) and load Mitsuba.

    device: "auto", "cpu" or "gpu". Call before importing drjit/mitsuba anywhere else.
    Idempotent: later calls return the first choice (a process cannot switch backends).
    """
    global _STATE
    if _STATE is not None:
        return _STATE
    device = (os.environ.get("MATFIT_DEVICE") or device).lower()
    if device not in ("auto", "cpu", "gpu"):
        raise RuntimeSetupError(f"unknown device {device!r}", hint="use auto, cpu or gpu")
    notes: list[str] = []
    gpu = cuda_device_name() if device in ("auto", "gpu") else None
    if device == "gpu" and gpu is None:
        raise RuntimeSetupError("a GPU was asked for, but no CUDA device answers",
                                hint="check `nvidia-smi`, or use --device cpu")
    if "drjit" in sys.modules and not os.environ.get("DRJIT_LIBLLVM_PATH") and gpu is None:
        notes.append("drjit was imported before matfit chose LLVM; its own search was used")
    llvm_path = llvm_ver = None
    if gpu is None:
        llvm_path, llvm_ver = find_llvm()
        os.environ["DRJIT_LIBLLVM_PATH"] = llvm_path
    n = threads or int(os.environ.get("MATFIT_THREADS", "0")) or default_threads()
    import drjit as dr  # noqa: E402  (import order is the point of this module)
    import mitsuba as mi
    variant = "cuda_ad_rgb" if gpu else "llvm_ad_rgb"
    try:
        mi.set_variant(variant)
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise RuntimeSetupError(f"Mitsuba variant {variant} cannot be used: {exc}",
                                hint=APT_HINT if variant.startswith("llvm") else "use --device cpu") from exc
    if variant.startswith("llvm"):
        dr.set_thread_count(n)
    _STATE = RuntimeInfo(variant=variant, backend="cuda" if gpu else "llvm", llvm_path=llvm_path,
                         llvm_version=llvm_ver, gpu=gpu, threads=n, notes=notes)
    return _STATE


def runtime_info() -> RuntimeInfo | None:
    return _STATE
