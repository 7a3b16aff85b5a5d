"""Pure statistics on arrays: latent scores and ranking, classification metrics and bootstrap, predictors, causal tests and their calibration."""
