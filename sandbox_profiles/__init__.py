"""Sandbox profiles (TOML) and OCI seccomp profiles shipped with the package."""
