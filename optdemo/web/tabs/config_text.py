"""The Configuration tab's texts: plain functions from engine data to Markdown and form values.

No gradio here: the tab's handlers (``config_tab.py``) put these texts into components, and tests
read them directly.
"""

from __future__ import annotations

from optdemo.app.machine import check_offload_folder, quantization_missing
from optdemo.app.service import DemoService
from optdemo.core.budget import format_bytes
from optdemo.core.errors import OptdemoError
from optdemo.core.load_config import LoadConfig
from optdemo.system.hardware import Hardware
from optdemo.web.render import status_text


def hardware_summary(hardware: Hardware) -> str:
    """Markdown: this machine's GPUs, RAM and free disk."""
    if hardware.gpus:
        gpus = "; ".join(
            f"GPU {g.index} {g.name}: {format_bytes(g.free_bytes)} free of {format_bytes(g.total_bytes)}"
            for g in hardware.gpus
        )
    else:
        gpus = "no CUDA GPU (everything runs on the CPU)"
    return (
        f"**GPUs:** {gpus}  \n**RAM:** {format_bytes(hardware.ram_available_bytes)} available of "
        f"{format_bytes(hardware.ram_total_bytes)}  \n**Disk:** {format_bytes(hardware.disk_free_bytes)} "
        f"free at `{hardware.disk_path}`"
    )


def quantization_availability(hardware: Hardware) -> tuple[bool, str]:
    """Whether 8-bit / 4-bit quantization can work here, and a sentence saying how (or why not)."""
    lacking = quantization_missing(hardware)
    if lacking:
        return False, f"8-bit / 4-bit need {lacking}."
    if not hardware.gpus:
        return True, ("torch's int8 / int4 CPU kernels; quantized once into the cache, disk tier included.")
    return True, "bitsandbytes quantizes Linear weights on the GPU."


def budget_spec(gpu_gib: list[float], cpu_gib: float, advanced: str) -> str:
    """The max_memory spec from the sliders, unless the advanced field has one (it wins)."""
    if advanced and advanced.strip():
        return advanced.strip()
    parts = [f"{index}={round(value * 1024)}MiB" for index, value in enumerate(gpu_gib)]
    parts.append(f"cpu={round(cpu_gib * 1024)}MiB")
    return ",".join(parts)


def model_label(model: object) -> str:
    """How the page names the model typed or picked in the form (its raw text if it is invalid)."""
    try:
        return LoadConfig(str(model or "")).display_name
    except OptdemoError:
        return str(model or "").strip()[:80] or "no model"


def offload_info(folder: str | None) -> str:
    """Markdown under the offload-folder field: where free space was measured and how much, or
    why the folder cannot be used."""
    check = check_offload_folder(folder)
    if check.problem is not None:
        return f"⚠ `{check.path}` {check.problem}."
    return f"Free space at `{check.disk_path}`: {format_bytes(check.free_bytes)}"


def status_for(service: DemoService, admin: str | None) -> str:
    """The status line for this caller (``admin``: its admin credential, if any): what is loaded,
    or, where it cannot load a model (a visitor in public mode), what it can do instead."""
    status = service.status()
    if status.loaded or service.is_admin(admin):
        return status_text(status)
    how = (
        "an admin can load one (sign in under *Admin sign-in* if you are one)"
        if service.settings.auth
        else "only the operator can load one"
    )
    return f"No model is loaded right now: {how}. Meanwhile you can preview plans of the models offered here."
