"""Recipes: one module per `urm` command, wiring the components together (as torchtune's recipes do).

A recipe loads its config, opens its inputs, runs the components, saves what they made and returns
a summary for the CLI to print: `extract`, `train` (train-heads, train-value-head, train-gating),
`export`, `score`, `cache_info`. `cli.py` calls only these; the components (the other modules of
`pipeline`) never import a recipe (tests/test_layout.py reads the imports to keep it so).
"""
