"""kmeminspect's test bed: real Debian kernels in QEMU (TCG), scenarios, dumps and ground truth."""
