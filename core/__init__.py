"""rwft.core: hook specs, plugin manager, registries, config, model, data, engine, metrics, logging, CLI."""
