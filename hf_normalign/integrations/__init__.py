"""Integrations with training libraries (import the submodule: ``hf_normalign.integrations.trl``)."""
