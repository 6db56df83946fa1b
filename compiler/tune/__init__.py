"""bertpress tune: search a recipe's {search: ...} options for the fastest (or smallest) recipe within its budget.

:mod:`compiler.search_space` reads the spaces (torch-free); :mod:`.search` proposes, screens and records;
:mod:`.screen` estimates a candidate with the cost model; :mod:`.trial` compiles one; :mod:`.frontier` draws
the Pareto front; :mod:`.ray_executor` runs the trials on a Ray cluster.
"""
