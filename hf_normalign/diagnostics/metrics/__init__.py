"""The diagnostics as metrics: each module holds a result, typed options, an accumulator (:mod:`..runner`) and the
model-level entry point.

- :mod:`.mir`: Modality Integration Rate (``mir``);
- :mod:`.profile`: norm and update-rate profiles (``modality_profile``);
- :mod:`.keyspace`: key-space gap (``key_space_gap``), with :mod:`.key_transform` for the normed / RoPE'd keys;
- :mod:`.degradation`: visual degradation across depth (``visual_degradation``).
"""
