"""The maths of the diagnostics on plain feature tensors. Nothing here imports model code.

- :mod:`.features`: input checks shared by every measure;
- :mod:`.frechet`: Gaussian moments and the Frechet distance;
- :mod:`.mir`: MIR from features (text scale, streaming moments) as plain numbers, and outlier rules
  (:mod:`.outliers`); the result class is ``metrics.mir.MIRResult``;
- :mod:`.norms`: per-token norm statistics and adjacent-layer cosines;
- :mod:`.mmd`: MMD with an RBF kernel, its bandwidth, seeded subsets;
- :mod:`.keyspace`: shared-PCA histograms and their JSD, t-SNE, the key-space options and one layer's numbers;
- :mod:`.reservoir`: a seeded uniform sample of a stream, mergeable across processes;
- :mod:`.degradation`: participation ratio, off-diagonal correlation, patch contrast, linear probe.
"""
