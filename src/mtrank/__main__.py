"""Run the ``mtrank`` command line as ``python -m mtrank``, which is how ``torchrun -m mtrank`` starts it."""

from mtrank.cli.main import main

if __name__ == "__main__":
    main()
