"""Everything that touches the kernel to contain a run: cgroups, network namespaces, the OCI
bundle. Needs root."""
