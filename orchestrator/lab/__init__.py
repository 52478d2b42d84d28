"""The lab: libvirt hosts on one machine and a simulated VFIO device."""
