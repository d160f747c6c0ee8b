"""Command-line entry point: ``python train.py fit|validate|test|predict --config configs/<name>.yaml``.

``pip install`` also gives it as the ``tpgrpo`` command (``tpgrpo fit --config configs/tiny.yaml``);
a config file, or a path in one, not found from the working directory is looked up in the package
(`tpgrpo.cli.resolve_path`).

Every setting of the model (`tpgrpo.training.module.TPGRPOModule`), the data
(`tpgrpo.training.data.PromptDataModule`) and the Lightning Trainer is a config value; ``--print_config``
shows them all and any can be overridden on the command line (``--model.algorithm flow-grpo``).
"""
from tpgrpo.cli import main

if __name__ == "__main__":
    main()
