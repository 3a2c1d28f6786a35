"""The training job and the commands beside it.

The job (`python -m train`): `__main__` (Hydra entry point), `config` (typed settings, pure
validation), `preflight` (file-system, init_from and package checks), `setup`, `loop`, `metrics`,
`logging`, `plots`, `sweep`, and the subpackages `data/` (corpus, tokenizer, token cache, batches),
`checkpoint/` (the checkpoint manager over DCP, safe reading, run weights, atomic files) and `hf/`
(Hugging Face mapping, files, import, export, init_from and upcycling).

The user tools (`python -m train.<tool>`; they may import the job, never the other way round):
`check`, `plan`, `report`, `specialization`, `generate`, `export_hf`, `import_hf`, sharing `cli`
(compose a job, print one error line, exit code).
"""
