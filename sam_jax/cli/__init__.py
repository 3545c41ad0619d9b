"""The console commands, one small module each: flags, exit codes, one-line errors, progress.

    sam-jax-train    sam_jax.cli.train     train or resume (python train.py)
    sam-jax-eval     sam_jax.cli.eval      zero-shot evaluation (python eval.py)
    sam-jax-convert  sam_jax.cli.convert   .pth <-> sam_jax checkpoints (python -m convert_weights)
    sam-jax-amg      sam_jax.cli.amg       automatic masks (python -m sam_jax.amg)
    sam-jax-predict  sam_jax.cli.predict   prompts on one image (python -m sam_jax.cli.predict)
    sam-jax-annotate sam_jax.cli.annotate  the data engine (python -m sam_jax.annotate)
    sam-jax-export   sam_jax.cli.export    ONNX / StableHLO files (python -m sam_jax.cli.export)

Every command is `main(argv=None, prog=...) -> exit status`, built on sam_jax.cli.common (argparse
only; 0 success, 1 the work failed, 2 usage error, 130 interrupted; one-line errors on stderr).
The work itself is library code (sam_jax.training, sam_jax.evaluation, sam_jax.checkpoints,
sam_jax.amg, sam_jax.predictor, sam_jax.outputs).
"""
