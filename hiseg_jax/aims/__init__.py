"""AIMS: mask prompt encoder, level decoders, TCM, association module, model, inference."""
