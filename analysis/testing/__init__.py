"""The testing wing: tiny random models of every supported family, built from configs.

Kept apart from the library (as transformers keeps ``testing_utils``): the tests, the benchmarks
and ``dyvte-stats tiny-model`` use it; the toolkit's core never imports it.

- :mod:`analysis.testing.tiny`: a tiny random LLaVA with a real processor, saved to a folder.
- :mod:`analysis.testing.families`: a tiny random model of each family in the adapter table.
"""
