"""The chapter's application: LeNet with batch norm trained on Fashion-MNIST (D2L, chapter 8.5).

Built on the `jaxbn` library, which never imports it: the model and its XLA:CPU
kernels (`models`, `kernels`), the data (`data`), the config checks (`settings`),
the pure train and eval steps (`steps`, `nnx_apply`), their data parallelism
(`parallel`), the training loop (`trainer`), its workdir (`workdir`) and the
provenance of results files (`provenance`). `train.py` and `configs/` drive it.
"""
