"""Recipes: one module per `urm` command, wiring the stages together (as torchtune's recipes do).

A recipe loads its config, opens its inputs, runs the stages' components, saves what they made and
returns a summary for the CLI to print: `extract`, `train` (train-heads, train-value-head,
train-gating), `export`, `evaluate`, `score`, `curate`, `serve`, `cache_info`, and `demo` (the others in a row).
`cli.py` calls only these; the stages (the other subpackages of `pipeline`) never import a recipe, and no recipe
but `demo` imports another: what two recipes share lives in a stage (tests/test_layout.py reads the imports to
keep it so).
"""
