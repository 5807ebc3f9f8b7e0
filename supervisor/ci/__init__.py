"""CI mode's evidence of one embedded run: the workspace manifest and scope guard, the signed
report and its summary. File I/O and Ed25519 signing only; no privilege of its own."""
