"""Live-migration orchestrator for VMs with VFIO devices."""

__version__ = "0.2.0"
