"""``python -m ablate``: the same as the ``ablate`` command (:mod:`ablate.cli`)."""

from ablate.cli import main

if __name__ == "__main__":
    main()
