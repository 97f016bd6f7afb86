"""The CuPy extra of setup.cfg (cuda11, cuda12, cuda13) for this host's
NVIDIA driver, from the CUDA major that nvidia-smi prints; none without
a driver or with one older than CUDA 11, and cuda13 for anything newer
than 13 (a driver runs code built for older CUDA).

The one copy of the rule: ``make install`` runs this file with the
system's Python before kgpu is installed (so it imports only the
standard library), and ``kgpu doctor`` imports it.

    python3 helper/cli/cudaextra.py      # prints cuda12, or none
"""

import re
import subprocess


def extra_for(smi_output):
    """The extra for ``nvidia-smi``'s output, or None."""
    m = re.search(r"CUDA Version: *(\d+)", smi_output or "")
    if not m or int(m.group(1)) < 11:
        return None
    return f"cuda{min(int(m.group(1)), 13)}"


def nvidia_smi():
    """nvidia-smi's output, or "" when it is missing or fails."""
    try:
        p = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout if p.returncode == 0 else ""


if __name__ == "__main__":
    print(extra_for(nvidia_smi()) or "none")
