"""The model-side core every stage shares: GLUE data, the one prunable encoder, fvcore FLOPs, the backbone."""
