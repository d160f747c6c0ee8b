"""Training with Lightning: the LightningModule (`module`), the prompt data (`data`), callbacks,
evaluation, the embedding cache and EMA. It composes the algorithms, families and rewards below it."""
