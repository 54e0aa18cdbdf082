"""Data package `appliance.systemd`: the unit, its GPU drop-in, environment file, TOML
template and install script, read by `appliance install-service`. Holds no code."""
