"""The Configuration tab's texts: plain functions from engine data to Markdown and form values.

No gradio here: the tab's handlers (``config_tab.py``) put these texts into components, and tests
read them directly.
"""

from __future__ import annotations

import os
import re

from optdemo.app.machine import check_offload_folder, quantization_missing
from optdemo.app.service import DemoService
from optdemo.core.budget import format_bytes, parse_max_memory, parse_size
from optdemo.core.catalog import TINY_MODEL_ID, catalog_entry
from optdemo.core.errors import OptdemoError
from optdemo.core.load_config import LoadConfig
from optdemo.system.hardware import Hardware
from optdemo.web.render import status_text
from optdemo.web.tabs.config_components import DRAFT_MODEL, ConfigTab

GIB = 2**30


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


# A size in decimal units as typed in a max_memory spec ("cpu=5GB", "0 = 1.5 tb").
_DECIMAL_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]b)\b", re.IGNORECASE)


def budget_units_note(spec: str) -> str:
    """What the decimal sizes typed in the max_memory field come to in the binary units the plan
    shows, e.g. "**Budget:** 5 GB = 4.66 GiB (a GB is 10^9 bytes, a GiB 2^30)"; "" when none."""
    seen: dict[str, str] = {}
    for number, unit in _DECIMAL_SIZE.findall(spec[:2000]):
        typed = f"{number} {unit.upper()}"
        try:
            seen.setdefault(typed, f"{typed} = {format_bytes(parse_size(number + unit))}")
        except OptdemoError:
            continue  # the plan says what is wrong with it
    if not seen:
        return ""
    return f"**Budget:** {'; '.join(seen.values())} (a GB is 10^9 bytes, a GiB 2^30: the plan counts in GiB)"


def model_label(model: object) -> str:
    """How the page names the model typed or picked in the form (its raw text if it is invalid).
    A Hub id outside the catalog is named in full: its last part alone may read as a catalog model
    (``facebok/opt-1.3b`` is not opt-1.3b)."""
    try:
        config = LoadConfig(str(model or ""))
    except OptdemoError:
        return str(model or "").strip()[:80] or "no model"
    hub_id = catalog_entry(config.model) is None and not os.path.isabs(config.model)
    return config.model if hub_id and config.model != TINY_MODEL_ID else config.display_name


def model_names(model: object) -> tuple[str, ...]:
    """Every name a message may give the model in the form: the page's (:func:`model_label`) and
    the engine's short one (``opt-1.3b`` for ``facebok/opt-1.3b``)."""
    try:
        return (model_label(model), LoadConfig(str(model or "")).display_name)
    except OptdemoError:
        return (model_label(model),)


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


def form_values_for(tab: ConfigTab, config: LoadConfig) -> dict:
    """The form's values that make ``config`` again: a budget the sliders cannot hold exactly
    (decimal units, beyond a slider's range) goes to the advanced field, which wins over them."""
    budget = config.max_memory.as_max_memory() if config.max_memory else {}
    gpus = [round(budget.get(index, 0) / GIB, 2) for index in range(len(tab.gpu_sliders))]
    cpu = round(budget.get("cpu", 0) / GIB, 2)
    sliders = dict(zip(tab.gpu_sliders, gpus, strict=True)) | {tab.cpu_slider: cpu}
    in_range = all(value <= (slider.maximum or 0) for slider, value in sliders.items())
    exact = (
        config.max_memory is not None and parse_max_memory(budget_spec(gpus, cpu, "")) == config.max_memory
    )
    return {
        **sliders,
        tab.advanced: "" if (exact and in_range) or config.max_memory is None else str(config.max_memory),
        tab.model: config.model,
        tab.revision: config.revision or "",
        tab.dtype: config.dtype,
        tab.quantization: config.quantization,
        tab.fast_offload: config.fast_offload,
        tab.cpu_layers: config.cpu_layers,
        tab.disk_tier: config.disk_tier,
        tab.tokenizer: config.tokenizer or "",
        tab.offload: config.offload_folder or "",
        tab.draft: DRAFT_MODEL if config.draft_model else config.draft,
        tab.draft_model: config.draft_model or "",
    }
