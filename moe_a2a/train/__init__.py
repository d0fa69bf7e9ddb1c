"""The recipe trainer behind ``python -m moe_a2a train``: a megatron-core GPT with MoE layers on moe_a2a.

    cli.py      the commands: ``train`` (``main``: checks before launch, ranks through ``moe_a2a.launch``)
                and ``demo`` (dispatch and combine on CPU ranks, checked against a local MoE)
    recipe.py   YAML schema, ``key=value`` overrides, validation, the dry-run report
    model.py    megatron-core parallel state, ``TransformerConfig`` and ``GPTModel`` from a recipe
    loop.py     one rank's training loop: gradient sync, AdamW, evaluation, logs, checkpoints
    corpus.py   the byte-level text corpus (``ByteCorpus``) the recipes train on

Megatron users who only want the dispatcher import ``moe_a2a.megatron``; this package builds on it.
"""
