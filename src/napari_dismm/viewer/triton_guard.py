"""Keep triton out of a napari process whose OpenGL runs on Mesa's LLVM.

Why: Mesa's software renderer (llvmpipe: Xvfb, VMs, remote desktops) maps libLLVM into
the process when napari's canvas starts; triton (which torch 2.14's CUDA build installs)
carries its own LLVM in libtriton, and loading it after Mesa's crashes the process with a
segfault. torch imports triton as soon as torchvision loads (torch._dynamo asks whether it
is installed) and takes an ImportError as "no triton", which only matters for compiling
GPU kernels (torch.compile) — never used by DisMM's inference. So before a widget's first
prediction imports torch, a process with libLLVM mapped that has not imported triton yet
gets triton marked missing: an ImportError for anyone who asks, instead of a crash.
"""

from __future__ import annotations

import sys


def keep_triton_out_if_llvm_loaded() -> bool:
    """Mark triton as missing when libLLVM is already mapped; True when it did so."""
    if "triton" in sys.modules or not llvm_mapped():
        return False
    sys.modules["triton"] = None  # `import triton` now raises ModuleNotFoundError
    return True


def llvm_mapped() -> bool:
    """Whether a libLLVM shared library is loaded in this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False
