"""The data contract: the event schema (columns, units) and the detector registry. Imports nothing else of raysvc."""
