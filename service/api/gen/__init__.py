"""Python code generated from protos/ by `make protos` (service.api.protogen). Do not edit."""
