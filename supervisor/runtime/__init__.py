"""OCI runtimes behind the daemon. `runc.Runc` is a thin 1:1 layer over the runc CLI."""
