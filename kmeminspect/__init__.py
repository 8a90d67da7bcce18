"""kmeminspect: the truth about a Linux kernel's physical-memory bookkeeping during memory hotplug."""

__version__ = "0.1.0"
