"""fedapp: the Flower glue (apps, config, results, launchers)."""
