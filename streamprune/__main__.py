"""`python -m streamprune ...`: the command line, as torchrun launches it (`torchrun ... -m streamprune run ...`)."""

from streamprune.cli import main

if __name__ == "__main__":
    main()
