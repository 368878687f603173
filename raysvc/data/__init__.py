"""Event data plane: schema, synthetic generator, PILArNet-M reader, shards on object storage, Ray Data pipeline."""
