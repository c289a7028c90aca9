"""Ensembles: combiners as estimators and `ensemble`."""
