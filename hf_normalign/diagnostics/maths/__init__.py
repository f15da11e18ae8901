"""The maths of the diagnostics on plain feature tensors. Nothing here imports model code.

- :mod:`.features`: input checks shared by every measure;
- :mod:`.frechet`: Gaussian moments and the Frechet distance;
- :mod:`.mir`: MIR from features (outlier rules, text scale, streaming moments);
- :mod:`.norms`: per-token norm statistics and adjacent-layer cosines;
- :mod:`.keyspace`: MMD, shared-PCA histograms and their JSD, t-SNE;
- :mod:`.degradation`: participation ratio, off-diagonal correlation, patch contrast, linear probe.
"""
