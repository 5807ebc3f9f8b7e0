"""The root daemon: event loop, arbiter, reconcile, watchdog, sd_notify."""
