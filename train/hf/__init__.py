"""Hugging Face models in and out: the exact architecture mapping (`mapping`), model-directory files
(`files`), and a run's initial weights from a transformers directory or an upcycled dense run
(`init_from`)."""
