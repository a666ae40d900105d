"""Run streamprune from a checkout: `python cli.py run MODEL_DIR OUT_DIR --sparsity 0.5`."""

from streamprune.cli import main

if __name__ == "__main__":
    main()
