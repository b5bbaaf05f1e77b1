"""What CUDA GPUs this machine has, for memory profiles and ``fluxredux doctor``.

torch is imported inside the functions only (seconds to import, and absent where only the
fake model runs): importing this module costs nothing, and without torch there is simply
no GPU to report.
"""

from __future__ import annotations

import shutil
import subprocess

from fluxredux.pipeline.memory_profiles import DeviceReport

# nvidia-smi answers in well under a second; a wedged driver must not hang `doctor`.
NVIDIA_SMI_TIMEOUT_SECONDS = 5.0


def cuda_devices() -> list[DeviceReport]:
    """Every visible CUDA GPU with its total and free memory now and its compute
    capability; empty without torch, without CUDA, or when the driver will not answer."""
    try:
        import torch
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        return [cuda_device(index) for index in range(torch.cuda.device_count())]
    except (RuntimeError, AssertionError):  # a driver or build that cannot start CUDA
        return []


def cuda_device(index: int) -> DeviceReport:
    """GPU ``index`` as a DeviceReport (CUDA must be available). Reading its free memory
    creates this process's CUDA context there: the free figure is what is left for work."""
    import torch

    free, total = torch.cuda.mem_get_info(index)
    major, minor = torch.cuda.get_device_capability(index)
    return DeviceReport(
        name=torch.cuda.get_device_name(index),
        total_bytes=int(total),
        free_bytes=int(free),
        capability=(int(major), int(minor)),
    )


def driver_facts() -> dict[str, str]:
    """torch's version and CUDA build, and the NVIDIA driver's version when nvidia-smi is on
    PATH. Never raises: whatever cannot be read says so instead."""
    facts: dict[str, str] = {}
    try:
        import torch
    except ImportError:
        facts["torch"] = "not installed"
    else:
        facts["torch"] = str(torch.__version__)
        facts["torch CUDA"] = str(torch.version.cuda) if torch.version.cuda else "none (a CPU build)"
    facts["driver"] = _driver_version()
    return facts


def _driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (nvidia-smi is not on PATH)"
    try:
        result = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"unknown (nvidia-smi gave no answer in {NVIDIA_SMI_TIMEOUT_SECONDS:g} s)"
    except OSError as exc:
        return f"unknown (nvidia-smi: {exc.strerror or exc})"
    versions = sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})
    if result.returncode != 0 or not versions:
        problem = (result.stderr or result.stdout).strip().splitlines()
        return f"unknown (nvidia-smi: {problem[0] if problem else f'exit {result.returncode}'})"
    return ", ".join(versions)
