"""Studies: small drivers over the engine that retrain models on modified datasets (long-tail
remove-top, privacy onion, SSFT two-phase). Each lives in its own module."""
