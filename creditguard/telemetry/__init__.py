"""The guard's telemetry: OpenTelemetry metrics and spans (``creditguard[otel]``)."""
