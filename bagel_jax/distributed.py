"""Multi-host start-up: ``jax.distributed.initialize`` when (and only when) the job spans several hosts.

Call ``initialize_distributed()`` first thing in ``main``, before any JAX computation or device query.

* Explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (absl flags defined
  here) or the same keyword arguments, for GPU clusters, several CPU processes, or tests on loopback.
  ``num_processes=1`` is a no-op.
* Cloud TPU VM (Google TPU chips on the PCI bus): JAX detects coordinator, process count and id itself
  (GCE TPU metadata, multi-slice MEGASCALE_* variables, GKE TPU_WORKER_* variables).
* Anything else (one CPU or GPU host): nothing happens, ``jax.process_count() == 1``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import jax
from absl import flags, logging

flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0's coordinator (multi-process runs outside Cloud TPU; on TPU VMs it is detected).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes in the job (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) (with --coordinator_address).")

_GOOGLE_PCI_VENDOR = "0x1ae0"
# Cloud TPU PCI device ids (v3, v4, v5p, v5e, v6e, 7x); other Google devices (e.g. the gVNIC NIC) are not TPUs.
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def on_cloud_tpu_vm() -> bool:
    """True if this host has Cloud TPU chips attached (read from the PCI bus; starts no backend)."""
    try:  # JAX's own table knows the newest chips; private, so fall back to ours if it moves
        from jax._src.hardware_utils import num_available_tpu_chips_and_device_id

        return num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError):
        pass
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            device = Path(vendor).with_name("device").read_text().strip()
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES:
                return True
        except OSError:
            continue
    return False


def _from_flags(name):
    fv = flags.FLAGS
    return fv[name].value if fv.is_parsed() else None


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts the JAX distributed runtime if the job has several processes; returns whether it did.

    Arguments left ``None`` fall back to the absl flags of the same names, then to
    ``JAX_COORDINATOR_ADDRESS`` (which ``jax.distributed`` reads too).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = (
        coordinator_address or _from_flags("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    )
    num_processes = num_processes if num_processes is not None else _from_flags("num_processes")
    process_id = process_id if process_id is not None else _from_flags("process_id")

    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "distributed: --coordinator_address, --num_processes and --process_id must be "
                f"given together, got {coordinator_address!r}, {num_processes!r}, {process_id!r}"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"distributed: process_id {process_id} not in [0, num_processes={num_processes})")
        if num_processes == 1:
            return False
        logging.info(
            "jax.distributed.initialize(%s, num_processes=%d, process_id=%d)",
            coordinator_address,
            num_processes,
            process_id,
        )
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
        return True
    if on_cloud_tpu_vm():
        logging.info("Cloud TPU VM detected: jax.distributed.initialize() with auto-detected hosts")
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    """True on process 0: the one that writes logs, metrics and images."""
    return jax.process_index() == 0


def describe() -> str:
    """One line for logs: process i/n, local and global device counts and kind."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} devices ({jax.devices()[0].device_kind})"
    )
