"""telemetry: the central monitor. Consumes device telemetry over MQTT, stores it, detects
drift, latency regressions, errors and silence, and raises alerts."""
