"""DIITO (Wu et al., NAACL 2022): the interchange plan (pairing: sources and spans) and one step's losses
with the counterfactual pass that reuses the standard pass (step)."""
