"""GPU health: one snapshot model, three sources (NVML, captures, scenarios), the checks."""
