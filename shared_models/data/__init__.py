"""The data contract and export ingest: spec, mapping, identifiers, validation, loading, splits."""
