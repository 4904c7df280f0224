"""Pre-train or uptrain a kvforge model with Lightning: ``python train.py fit --config configs/...yaml``.

See ``kvforge.training.lightning_cli`` for the subcommands, overrides and where outputs go."""

from kvforge.training.lightning_cli import main

if __name__ == "__main__":  # DDP re-launches this script in every worker process
    main()
