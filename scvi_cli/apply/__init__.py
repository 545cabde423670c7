"""A trained model applied to cells: queries (embed, impute, sample, loadings, VampPrior), evaluation, outputs."""
